"""Keeping a Ray cluster that lmforge starts itself on this machine's loopback interface."""

import os

# Ray's local-only mode (its default on macOS and Windows): the node's address becomes 127.0.0.1, and with it
# every Ray process binds there instead of on all interfaces: GCS, raylet, object manager, driver, workers,
# agents, and the Prometheus endpoints of the autoscaler monitor and the dashboard process. ray.init() has
# no argument for it (it turns _node_ip_address="127.0.0.1" back into the routable address).
LOOPBACK_ONLY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def use_loopback_only() -> None:
    """Call before ray.init() starts or joins a cluster on this machine."""
    from ray._private import ray_constants

    os.environ.update(LOOPBACK_ONLY_ENV)
    # Ray read that switch into a constant when it was imported (maybe before this call); the processes it
    # starts read it from the environment.
    ray_constants.ENABLE_RAY_CLUSTER = False
