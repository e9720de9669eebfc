#!/usr/bin/env bash
# `make run`: start a single-host cluster with its data under ./.corral and say how to use it.
# Every CORRAL_* variable in the environment reaches the agent (e.g. CORRAL_DRIVER, CORRAL_HTTP_PORT).
set -euo pipefail
cd "$(dirname "$0")/.."
export CORRAL_DATA_DIR="${CORRAL_DATA_DIR:-$PWD/.corral}"
export CORRAL_NAME="${CORRAL_NAME:-$(hostname -s | tr 'A-Z_' 'a-z-' | cut -c1-63)}"
bind="${CORRAL_BIND:-127.0.0.1}"
port="${CORRAL_HTTP_PORT:-8700}"
driver="${CORRAL_DRIVER:-fake}"
url="http://$bind:$port"
mkdir -p "$CORRAL_DATA_DIR"
bootstrap=()
[ -d "$CORRAL_DATA_DIR/etcd/member" ] || bootstrap=(--bootstrap)
.venv/bin/corral agent "${bootstrap[@]}" 2>>"$CORRAL_DATA_DIR/agent.log" &
agent=$!
trap 'kill -TERM $agent 2>/dev/null; wait $agent' INT TERM
for _ in $(seq 1 300); do
  if curl -fsS "$url/readyz" >/dev/null 2>&1; then break; fi
  if ! kill -0 $agent 2>/dev/null; then
    echo "corral agent exited; last lines of $CORRAL_DATA_DIR/agent.log:" >&2
    tail -n 20 "$CORRAL_DATA_DIR/agent.log" >&2
    exit 1
  fi
  sleep 0.2
done
cat <<MSG

  corral is running: node $CORRAL_NAME, data in $CORRAL_DATA_DIR
  API:       $url/api/v1   (OpenAPI: $url/api/v1/openapi.json, docs: $url/api/v1/docs)
  Log:       $CORRAL_DATA_DIR/agent.log
MSG
if [ "$driver" = "fake" ]; then
  cat <<MSG
  Driver:    fake -- VMs are SIMULATED in memory; no guest runs. Real QEMU guests arrive with
             the QEMU driver (issue 4); until then this cluster exercises the control plane only.
MSG
fi
cat <<MSG

  Try, in another terminal:
    export PATH=$PWD/.venv/bin:\$PATH
    corral cluster status
    corral vm create web-1 --vcpus 2 --memory 512 --label tier=web
    corral vm ls

  Ctrl-C stops the agent (the cluster's state stays in $CORRAL_DATA_DIR).
MSG
wait $agent
