#!/usr/bin/env bash
# A multi-node Ray cluster on this machine, every node on 127.0.0.1 and token authentication on: for trying
# `lmforge submit` and for the jobs tests.
#
#   export RAY_AUTH_TOKEN=$(openssl rand -hex 32)
#   cluster/local-cluster.sh start --workers 1      # prints RAY_ADDRESS=http://127.0.0.1:<dashboard port>
#   cluster/local-cluster.sh stop                   # ends exactly the processes that `start` started
#
# Options of start: --workers N (worker nodes besides the head, default 1), --head-cpus N and --worker-cpus N
# (each node's logical CPUs, default 1), --object-store-mb N (each node's object store, default 256),
# --timeout S (how long to wait for every node to join, default 180).
# Node i (the head is 0) has the custom resource {"node_<i>": 1}, so a task can be pinned to a node.
# State (pids, ports, logs, each node's Ray temp dir): $LMFORGE_CLUSTER_DIR, else /tmp/lmforge-cluster-$USER.
set -euo pipefail
me="$(basename "$0")"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
fail() { echo "$me: $*" >&2; exit 2; }

state="${LMFORGE_CLUSTER_DIR:-/tmp/lmforge-cluster-${USER:-$(id -un)}}"
command="${1:-}"
[[ "$command" == start || "$command" == stop ]] || fail "usage: $me start [--workers N] [--head-cpus N]" \
  "[--worker-cpus N] [--object-store-mb N] [--timeout S] | $me stop"
shift

# Every pid file names a `ray start --block` process this script started; it is its process group's leader
# (setsid), so stopping it can also reach anything of that node's that outlived it.
stop_nodes() {
  local pid_file pid waited
  # Workers first, each before the next: a worker whose head is gone waits for it before it exits.
  for pid_file in $(ls -r "$state"/node-*.pid 2>/dev/null); do
    pid="$(<"$pid_file")"
    kill -TERM "$pid" 2>/dev/null || true  # `ray start --block` stops its node's Ray processes on SIGTERM
    for ((waited = 0; waited < 60; waited++)); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.5
    done
    if kill -0 "$pid" 2>/dev/null; then
      echo "$me: node process $pid did not stop within 30 s; killing its process group" >&2
    fi
    # Ray processes that ignored the node's shutdown still carry its process group.
    kill -KILL -- "-$pid" 2>/dev/null || true
    rm -f "$pid_file"
  done
  rm -f "$state/address"
}

if [[ "$command" == stop ]]; then
  [[ -d "$state" ]] || { echo "$me: no cluster state in $state; nothing to stop" >&2; exit 0; }
  stop_nodes
  echo "$me: stopped the cluster in $state" >&2
  exit 0
fi

workers=1 head_cpus=1 worker_cpus=1 store_mb=256 timeout=180
while (($#)); do
  case "$1" in
    --workers) workers="${2:?--workers needs a number}"; shift ;;
    --head-cpus) head_cpus="${2:?--head-cpus needs a number}"; shift ;;
    --worker-cpus) worker_cpus="${2:?--worker-cpus needs a number}"; shift ;;
    --object-store-mb) store_mb="${2:?--object-store-mb needs a number}"; shift ;;
    --timeout) timeout="${2:?--timeout needs seconds}"; shift ;;
    *) fail "unknown option $1" ;;
  esac
  shift
done
for value in "$workers" "$head_cpus" "$worker_cpus" "$store_mb" "$timeout"; do
  [[ "$value" =~ ^[0-9]+$ ]] || fail "options take whole numbers; got $value"
done
((workers >= 1)) || fail "--workers must be 1 or more (a head alone is cluster/start-head.sh)"

. "$here/require-token.sh"
ray_bin="$(command -v ray)" || fail "ray is not on PATH; activate the environment lmforge is installed in"
# Jobs run `lmforge train ...` through a shell on the head: it must find the lmforge installed beside ray.
export PATH="$(dirname "$ray_bin"):$PATH"
python_bin="$(dirname "$ray_bin")/python"
[[ -x "$python_bin" ]] || python_bin="$(command -v python3)"

mkdir -p "$state"
shopt -s nullglob
for pid_file in "$state"/node-*.pid; do
  if kill -0 "$(<"$pid_file")" 2>/dev/null; then
    fail "a cluster from $state is running (RAY_ADDRESS=$(cat "$state/address" 2>/dev/null)); run '$me stop' first"
  fi
  rm -f "$pid_file"
done
shopt -u nullglob

# Ports for the head's GCS, dashboard and Ray Client server, and four agent ports per node: fixed defaults
# would collide between the nodes here and with any other Ray cluster on this machine. They are drawn below
# the kernel's ephemeral range (and above Ray's worker ports, 10002-19999): a port the kernel hands out to
# one of Ray's processes meanwhile cannot take one before the node that needs it starts.
nodes=$((workers + 1))
read -r -a ports <<<"$("$python_bin" - "$((3 + 4 * nodes))" <<'EOF'
import random, socket, sys
try:
    first_ephemeral = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
except OSError:
    first_ephemeral = 32768
chosen = []
for port in random.sample(range(20000, first_ephemeral), first_ephemeral - 20000):
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            continue
    chosen.append(port)
    if len(chosen) == int(sys.argv[1]):
        break
print(" ".join(map(str, chosen)))
EOF
)"
gcs_port="${ports[0]}" dashboard_port="${ports[1]}" client_port="${ports[2]}"
address="http://127.0.0.1:$dashboard_port"

# `lmforge stop` / `ray job stop` send the job's driver this signal: SIGINT reaches `lmforge train` as
# Ctrl-C, which ends its MLflow run KILLED and leaves its checkpoints resumable; Ray's default SIGTERM would
# end the driver before it could say so. It gets 30 s to do that before Ray kills it.
export RAY_JOB_STOP_WAIT_TIME_S=30
export RAY_USAGE_STATS_ENABLED=0

node_args() {  # node index -> the ray start options every node needs its own values of
  local i="$1" base=$((3 + 4 * $1))
  local cpus="$worker_cpus"
  ((i == 0)) && cpus="$head_cpus"
  mkdir -p "$state/node-$i"
  echo "--block --num-cpus=$cpus --resources={\"node_$i\":1} --object-store-memory=$((store_mb * 1024 * 1024))" \
       "--temp-dir=$state/node-$i --dashboard-agent-listen-port=${ports[base]}" \
       "--dashboard-agent-grpc-port=${ports[base + 1]} --metrics-export-port=${ports[base + 2]}" \
       "--runtime-env-agent-port=${ports[base + 3]}"
}

# The head: start-head.sh's loopback mode (Ray's local-only mode binds every head process to 127.0.0.1).
# shellcheck disable=SC2046
RAY_PORT="$gcs_port" setsid "$here/start-head.sh" $(node_args 0) --dashboard-port="$dashboard_port" \
  --ray-client-server-port="$client_port" >"$state/node-0.log" 2>&1 &
echo $! >"$state/node-0.pid"

# Worker nodes: Ray's `ray start` refuses to add a node in local-only mode, and otherwise rewrites
# 127.0.0.1 (the node's address and the head's) to this machine's routable address, where the head does not
# listen. So each worker runs Ray's own `ray start` entry point with that one rewrite turned off.
join_on_loopback='import sys
from ray._private import services
services.resolve_ip_for_localhost = lambda host: host  # keep 127.0.0.1: this cluster stays on loopback
from ray.scripts.scripts import main
sys.argv[0] = "ray"
sys.exit(main())'
for ((i = 1; i <= workers; i++)); do
  # shellcheck disable=SC2046
  setsid "$python_bin" -c "$join_on_loopback" start --address="127.0.0.1:$gcs_port" --node-ip-address=127.0.0.1 \
    $(node_args "$i") >"$state/node-$i.log" 2>&1 &
  echo $! >"$state/node-$i.pid"
done

# Wait until every node is alive, through the dashboard the jobs go to (the state API, with the token).
if ! "$python_bin" - "$address" "$nodes" "$timeout" "$state" <<'EOF'
import os, sys, time
import warnings
warnings.filterwarnings("ignore")
address, nodes, timeout, state = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
deadline = time.monotonic() + timeout
alive, error = 0, "no answer yet"
while time.monotonic() < deadline:
    for i in range(nodes):  # a node process that exited will never join: say which, with its log
        pid = int(open(f"{state}/node-{i}.pid").read())
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            log = open(f"{state}/node-{i}.log", errors="replace").read().strip().splitlines()[-5:]
            sys.exit(f"node {i} exited while starting; the end of {state}/node-{i}.log:\n" + "\n".join(log))
    try:
        from ray.util.state import list_nodes

        alive = sum(n.state == "ALIVE" for n in list_nodes(address=address, raise_on_missing_output=False))
        if alive == nodes:
            sys.exit(0)
    except Exception as e:  # the dashboard is still starting
        error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    time.sleep(2)
sys.exit(f"{alive} of {nodes} nodes alive after {timeout:.0f} s ({error}); logs in {state}/node-*.log")
EOF
then
  stop_nodes
  fail "the cluster did not start; its processes are stopped"
fi
echo "$address" >"$state/address"
echo "$me: $nodes nodes on 127.0.0.1 (head: $head_cpus CPU, node_0; $workers worker(s): $worker_cpus CPU each," \
     "node_1..node_$workers); token authentication on; stop with '$me stop'" >&2
echo "RAY_ADDRESS=$address"
