#!/usr/bin/env bash
# Start a Ray head node for lmforge jobs. The dashboard binds to 127.0.0.1 (reach it over an SSH tunnel);
# with RAY_AUTH_TOKEN set, the cluster requires that token from every client (Ray token auth).
set -euo pipefail
if [[ -n "${RAY_AUTH_TOKEN:-}" ]]; then
  export RAY_AUTH_MODE=token
fi
exec ray start --head --port="${RAY_PORT:-6379}" --dashboard-host=127.0.0.1 "$@"
