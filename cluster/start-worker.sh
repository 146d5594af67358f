#!/usr/bin/env bash
# Join a GPU node to the head started by start-head.sh: cluster/start-worker.sh HEAD_IP:6379
set -euo pipefail
head="${1:?usage: cluster/start-worker.sh HEAD_IP:PORT}"
shift
if [[ -n "${RAY_AUTH_TOKEN:-}" ]]; then
  export RAY_AUTH_MODE=token
fi
exec ray start --address="$head" "$@"
