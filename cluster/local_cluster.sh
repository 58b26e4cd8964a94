#!/usr/bin/env bash
# A local multi-node Ray cluster on one host: one head and N worker nodes, each its own raylet, object
# store and agents, for trying the multi-node path (placement across nodes, node loss) on a laptop.
#
#   cluster/local_cluster.sh start 2     # head + 2 worker nodes; prints the address for `ray job submit`
#   ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/fuse.py spec.yaml
#   cluster/local_cluster.sh status      # nodes and resources
#   cluster/local_cluster.sh stop        # stops only this cluster's processes (not other Ray instances)
#
# Env: HR_CLUSTER_DIR (state and Ray temp dir, default /tmp/hr-cluster; keep it short, Ray's socket paths
# must stay under 107 characters), HR_PORT (GCS port, default 6390; node i uses HR_PORT+100*i..+99),
# HR_DASHBOARD_PORT (8265), HR_HEAD_CPUS (2), HR_CPUS_PER_NODE (2).
# Multi-node mode needs the host's own address (Ray refuses a second node when
# RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 pins it to loopback); the dashboard and job API stay on 127.0.0.1.
set -euo pipefail
DIR="${HR_CLUSTER_DIR:-/tmp/hr-cluster}"
PORT="${HR_PORT:-6390}"
DASH="${HR_DASHBOARD_PORT:-8265}"
HEAD_CPUS="${HR_HEAD_CPUS:-2}"
CPUS="${HR_CPUS_PER_NODE:-2}"
RAY="${RAY_BIN:-ray}"
unset RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-disabled}" DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"

node_ports() {  # the per-node agent and worker ports, so that nodes on one host never collide
  local base=$1
  echo --node-manager-port=$((base + 1)) --object-manager-port=$((base + 2)) \
    --runtime-env-agent-port=$((base + 3)) --dashboard-agent-grpc-port=$((base + 4)) \
    --dashboard-agent-listen-port=$((base + 5)) --metrics-export-port=$((base + 6)) \
    --min-worker-port=$((base + 10)) --max-worker-port=$((base + 99))
}

start() {
  local workers="${1:-2}"
  if [ -e "$DIR/ray" ]; then echo "a cluster already uses $DIR (run: $0 stop)" >&2; exit 1; fi
  mkdir -p "$DIR"
  # shellcheck disable=SC2046
  "$RAY" start --head --port="$PORT" --dashboard-host=127.0.0.1 --dashboard-port="$DASH" \
    --num-cpus="$HEAD_CPUS" --temp-dir="$DIR/ray" --disable-usage-stats $(node_ports $((PORT + 10000))) \
    --ray-client-server-port=$((PORT + 10007)) \
    >"$DIR/head.log" 2>&1 || { cat "$DIR/head.log" >&2; exit 1; }
  local gcs; gcs="$(grep -o "address='[^']*'" "$DIR/head.log" | head -1 | cut -d"'" -f2)"
  echo "$gcs" >"$DIR/gcs_address"
  for i in $(seq 1 "$workers"); do
    # shellcheck disable=SC2046
    "$RAY" start --address="$gcs" --num-cpus="$CPUS" $(node_ports $((PORT + 100 * i))) \
      >"$DIR/worker-$i.log" 2>&1 || { cat "$DIR/worker-$i.log" >&2; exit 1; }
  done
  echo "Ray cluster: head + $workers worker nodes, GCS $gcs; jobs and dashboard: http://127.0.0.1:$DASH"
}

kill_holders() {  # every process with a file open under $DIR (its Ray logs), but this script and its callers
  [ -d /proc ] || return 0
  local sig=$1 keep=" " p=$$ pid
  while [ "${p:-1}" -gt 1 ]; do
    keep+="$p "; p="$(awk '/^PPid:/ {print $2}' "/proc/$p/status" 2>/dev/null || true)"
  done
  for pid in $(find /proc/[0-9]*/fd -maxdepth 1 -lname "$DIR/*" -printf '%h\n' 2>/dev/null | cut -d/ -f3 | sort -u); do
    if [[ "$keep" != *" $pid "* ]]; then kill -s "$sig" "$pid" 2>/dev/null || true; fi
  done
}

stop() {
  # the cluster's processes carry its temp dir on their command line, but those that rename themselves
  # (ray::DashboardAgent, ray::RuntimeEnvAgent) or are started without it (the client server): every one of
  # them holds its log files open under the temp dir
  pkill -f "$DIR/ray" || true
  kill_holders TERM
  sleep 2
  pkill -9 -f "$DIR/ray" || true
  kill_holders KILL
  rm -rf "$DIR"
  echo "stopped the cluster in $DIR"
}

case "${1:-}" in
  start) start "${2:-2}" ;;
  status) "$RAY" status --address "$(cat "$DIR/gcs_address")" ;;
  stop) stop ;;
  *) echo "usage: $0 start [N_WORKER_NODES] | status | stop" >&2; exit 2 ;;
esac
