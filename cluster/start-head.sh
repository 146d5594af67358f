#!/usr/bin/env bash
# Start a Ray head node for lmforge jobs, with Ray token authentication (RAY_AUTH_TOKEN) required.
#
#   cluster/start-head.sh                                 # reachable from this machine only (127.0.0.1)
#   cluster/start-head.sh --node-ip-address=10.0.0.5      # reachable from 10.0.0.5's network (or LMFORGE_HEAD_IP)
#
# The dashboard binds to 127.0.0.1 either way (reach it over an SSH tunnel). Other arguments go to `ray start`.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/require-token.sh"

ip="${LMFORGE_HEAD_IP:-}"
args=()
while (($#)); do
  case "$1" in
    --node-ip-address=*) ip="${1#*=}" ;;
    --node-ip-address) ip="${2:?--node-ip-address needs an address}"; shift ;;
    *) args+=("$1") ;;
  esac
  shift
done
port="${RAY_PORT:-6379}"
if [[ -n "$ip" ]]; then
  echo "start-head.sh: this Ray cluster is reachable from the network of $ip (port $port and Ray's other" \
       "ports); every worker and client must present RAY_AUTH_TOKEN" >&2
  args+=(--node-ip-address="$ip")
else
  # Ray's local-only mode: the node's address is 127.0.0.1 and every Ray process listens there. (Ray turns
  # --node-ip-address=127.0.0.1 into the machine's routable address, so this is the way to say loopback.)
  export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
  echo "start-head.sh: this Ray cluster listens on 127.0.0.1 only; name an address to open it to a network" \
       "(--node-ip-address=ADDRESS or LMFORGE_HEAD_IP)" >&2
fi
exec ray start --head --port="$port" --dashboard-host=127.0.0.1 ${args[@]+"${args[@]}"}
