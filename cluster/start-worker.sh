#!/usr/bin/env bash
# Join a node to the head started by start-head.sh: cluster/start-worker.sh HEAD_IP:6379 [ray start args]
# It needs the head's RAY_AUTH_TOKEN and refuses to start without one.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/require-token.sh"
head="${1:?usage: cluster/start-worker.sh HEAD_IP:PORT}"
shift
exec ray start --address="$head" "$@"
