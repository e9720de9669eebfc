#!/usr/bin/env bash
# `make cluster`: a 3-server + 1 compute-host cluster on this machine (127.0.0.1-.4), data in
# ./.cluster/<name>. `make cluster-stop` (or `scripts/cluster.sh stop`) stops it.
set -euo pipefail
cd "$(dirname "$0")/.."
root="$PWD/.cluster"
corral=".venv/bin/corral"
FAST=(--lease-ttl-s 6 --leader-ttl-s 5)

stop() {
  for pidfile in "$root"/*/agent.pid; do
    [ -f "$pidfile" ] || continue
    kill -TERM "$(cat "$pidfile")" 2>/dev/null || true
  done
  for _ in $(seq 1 100); do
    ls "$root"/*/agent.pid >/dev/null 2>&1 || break
    sleep 0.1
  done
  echo "cluster stopped (state kept in $root; rm -rf $root to start afresh)"
}

start_agent() {  # name addr extra-args...
  local name=$1 addr=$2; shift 2
  # Serf's RPC listens on 127.0.0.1 for every host: give each its own port.
  local rpc=$((8705 + 10 * ${addr##*.}))
  mkdir -p "$root/$name"
  "$corral" agent --name "$name" --bind "$addr" --data-dir "$root/$name" --gossip-rpc-port "$rpc" \
    "${FAST[@]}" "$@" \
    >>"$root/$name/agent.log" 2>&1 &
  for _ in $(seq 1 600); do
    curl -fsS "http://$addr:8700/readyz" >/dev/null 2>&1 && return 0
    kill -0 $! 2>/dev/null || { echo "agent $name failed; see $root/$name/agent.log" >&2; tail -5 "$root/$name/agent.log" >&2; exit 1; }
    sleep 0.2
  done
  echo "agent $name not ready after 120s" >&2; exit 1
}

if [ "${1:-start}" = "stop" ]; then stop; exit 0; fi

if [ -f "$root/n1/cluster.json" ]; then
  # Restart: every host remembers its cluster.
  start_agent n1 127.0.0.1
  start_agent n2 127.0.0.2
  start_agent n3 127.0.0.3
  start_agent c1 127.0.0.4 --no-server
else
  start_agent n1 127.0.0.1 --bootstrap
  token=$(CORRAL_ADDR=http://127.0.0.1:8700 "$corral" token create --ttl 10m --uses 3 2>/dev/null)
  start_agent n2 127.0.0.2 --join 127.0.0.1 --token "$token"
  start_agent n3 127.0.0.3 --join 127.0.0.2 --token "$token"
  start_agent c1 127.0.0.4 --join 127.0.0.3 --token "$token" --no-server
fi
export CORRAL_ADDR=http://127.0.0.1:8700
"$corral" cluster status
"$corral" node ls
echo
echo "cluster running: any host answers the API (CORRAL_ADDR=http://127.0.0.{1,2,3,4}:8700)."
echo "stop it with: make cluster-stop"
