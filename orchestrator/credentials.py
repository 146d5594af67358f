"""Signing in to an authenticated MLflow server (and W&B): which environment variables carry the login, how
they reach Ray workers without being logged, and a clear error when the server refuses them."""

import os
from collections.abc import Mapping

from common.errors import LmforgeError

# What MLflow's and W&B's clients read on every request. They travel only in the environment (and, for a
# remote cluster, inside the train loop's config): never in lmforge's config, a run's params or tags, a
# Ray runtime_env (the Ray dashboard shows those), or a log line.
CREDENTIAL_ENV = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN",
                  "MLFLOW_TRACKING_INSECURE_TLS", "MLFLOW_TRACKING_SERVER_CERT_PATH",
                  "MLFLOW_TRACKING_CLIENT_CERT_PATH", "WANDB_API_KEY")

# MLflow's error codes for the HTTP statuses of a refused login (mlflow.exceptions' status mapping).
REFUSAL_STATUS = {"UNAUTHENTICATED": 401, "CUSTOMER_UNAUTHORIZED": 401, "PERMISSION_DENIED": 403}


def client_credentials(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The credentials set in this process, to hand to workers that do not inherit its environment."""
    return {name: environ[name] for name in CREDENTIAL_ENV if environ.get(name)}


def apply_credentials(credentials: Mapping[str, str]) -> None:
    """On a worker: sign in as the user who started the run (their login wins over one the machine has)."""
    os.environ.update({k: v for k, v in credentials.items() if k in CREDENTIAL_ENV})


def is_refusal(error: BaseException) -> bool:
    """The server answered and refused the login: retrying cannot help."""
    return getattr(error, "error_code", None) in REFUSAL_STATUS


def refusal_error(error: BaseException, shown_uri: str, experiment: str) -> LmforgeError | None:
    """A one-line LmforgeError for a refused login (HTTP 401/403), else None. It names the user, never the
    password."""
    status = REFUSAL_STATUS.get(getattr(error, "error_code", None))
    if status is None:
        return None
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    if status == 401:
        who = f"for user {user!r}" if user else "(MLFLOW_TRACKING_USERNAME is not set)"
        return LmforgeError(f"MLflow at {shown_uri} refused the credentials {who} (HTTP 401): set "
                            "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD to an account of that server")
    return LmforgeError(f"MLflow at {shown_uri} refused user {user!r} (HTTP 403): it needs EDIT permission on "
                        f"experiment {experiment!r} (ask the server's admin), or set tracking.experiment to an "
                        "experiment of its own")
