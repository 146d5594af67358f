"""Torch's rendezvous store on loopback, for runs on the embedded (loopback-only) Ray cluster.

Rank 0's TCPStore is the one listener of a training run that Ray's local-only mode does not reach: torch
binds it on all interfaces and has no bind-address option, only `master_listen_fd`. On the embedded cluster
every rank is on this machine and rendezvous at 127.0.0.1, so rank 0 hands torch a socket already bound to
that address. Gloo's own connections stay on loopback through GLOO_SOCKET_IFNAME=lo (launcher.connect).
"""

import socket

from ray.train.torch import TorchConfig
from ray.train.torch.config import _TorchBackend

LOOPBACK_HOSTS = ("127.0.0.1", "localhost")


def bind_store_to_loopback() -> None:
    """Run on each worker before its process group starts: rank 0's store listens on the loopback address it
    is reached at. A torch without the hook it wraps keeps its own behaviour."""
    import importlib

    import torch.distributed as dist

    # By module path: torch.distributed.rendezvous is also the name of a function.
    rendezvous = importlib.import_module("torch.distributed.rendezvous")
    create = getattr(rendezvous, "_create_c10d_store", None)
    if create is None or getattr(create, "lmforge_loopback", False):
        return

    def create_store(hostname, port, rank, world_size, timeout, use_libuv=True):
        if rank != 0 or hostname not in LOOPBACK_HOSTS:
            return create(hostname, port, rank, world_size, timeout, use_libuv)
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", port))
        listener.listen(socket.SOMAXCONN)
        # detach(): the store owns the descriptor from here on; the Python socket must not close it.
        return dist.TCPStore(hostname, port, world_size, True, timeout, master_listen_fd=listener.detach(),
                             use_libuv=use_libuv)

    create_store.lmforge_loopback = True
    rendezvous._create_c10d_store = create_store


class LoopbackTorchBackend(_TorchBackend):
    def on_start(self, worker_group, backend_config):
        worker_group.execute(bind_store_to_loopback)
        super().on_start(worker_group, backend_config)


class LoopbackTorchConfig(TorchConfig):
    @property
    def backend_cls(self):
        return LoopbackTorchBackend
