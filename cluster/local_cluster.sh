#!/usr/bin/env bash
# A local multi-node Ray cluster on 127.0.0.1: one head and N worker nodes, each a separate raylet.
#
#   cluster/local_cluster.sh start 2     # head + 2 workers; prints the dashboard address for `ray job submit`
#   ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/fuse.py spec.yaml
#   cluster/local_cluster.sh stop        # stops only the processes of this cluster (not other Ray instances)
#
# Env: HR_CLUSTER_DIR (state + Ray temp dir, default /tmp/hr-cluster), HR_PORT (GCS, 6390),
# HR_DASHBOARD_PORT (8265), HR_CPUS_PER_NODE (4).
set -euo pipefail
DIR="${HR_CLUSTER_DIR:-/tmp/hr-cluster}"
PORT="${HR_PORT:-6390}"
DASH="${HR_DASHBOARD_PORT:-8265}"
CPUS="${HR_CPUS_PER_NODE:-4}"
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"

start() {
  local workers="${1:-2}"
  mkdir -p "$DIR"
  ray start --head --port="$PORT" --node-ip-address=127.0.0.1 --dashboard-host=127.0.0.1 \
    --dashboard-port="$DASH" --num-cpus="$CPUS" --temp-dir="$DIR/ray" --disable-usage-stats \
    --dashboard-agent-listen-port=$((PORT + 5)) --dashboard-agent-grpc-port=$((PORT + 4)) \
    --runtime-env-agent-port=$((PORT + 3)) --metrics-export-port=$((PORT + 6)) >"$DIR/head.log"
  for i in $(seq 1 "$workers"); do
    local base=$((PORT + 100 * i))
    ray start --address="127.0.0.1:$PORT" --node-ip-address=127.0.0.1 --num-cpus="$CPUS" \
      --node-manager-port=$((base + 1)) --object-manager-port=$((base + 2)) \
      --runtime-env-agent-port=$((base + 3)) --dashboard-agent-grpc-port=$((base + 4)) \
      --dashboard-agent-listen-port=$((base + 5)) --metrics-export-port=$((base + 6)) \
      --min-worker-port=$((base + 10)) --max-worker-port=$((base + 99)) >"$DIR/worker-$i.log"
  done
  echo "Ray cluster: head 127.0.0.1:$PORT + $workers workers; jobs: http://127.0.0.1:$DASH"
}

stop() {
  # every process of this cluster carries its temp dir on its command line
  pkill -f "$DIR/ray" || true
  sleep 2
  pkill -9 -f "$DIR/ray" || true
  echo "stopped the cluster in $DIR"
}

case "${1:-}" in
  start) start "${2:-2}" ;;
  stop) stop ;;
  *) echo "usage: $0 start [N_WORKERS] | stop" >&2; exit 2 ;;
esac
