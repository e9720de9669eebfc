#!/usr/bin/env bash
# `make run`: start a single-host cluster with its data under ./.corral and say how to use it.
# Every CORRAL_* variable in the environment reaches the agent (e.g. CORRAL_DRIVER, CORRAL_HTTP_PORT).
set -euo pipefail
cd "$(dirname "$0")/.."
export CORRAL_DATA_DIR="${CORRAL_DATA_DIR:-$PWD/.corral}"
mkdir -p "$CORRAL_DATA_DIR"
export CORRAL_NAME="${CORRAL_NAME:-$(hostname -s | tr 'A-Z_' 'a-z-' | cut -c1-63)}"
bind="${CORRAL_BIND:-127.0.0.1}"
port="${CORRAL_HTTP_PORT:-8700}"
# Real guests by default: build the test guest (cached) and use QEMU; if QEMU cannot run here,
# fall back to the simulated driver and say so loudly.
if [ -z "${CORRAL_DRIVER:-}" ]; then
  if bash guest/build.sh >"$CORRAL_DATA_DIR/guest-build.log" 2>&1 \
     && qemu-system-x86_64 -machine none -nodefaults -display none -S -daemonize \
          -pidfile "$CORRAL_DATA_DIR/qemu-check.pid" >/dev/null 2>&1; then
    kill "$(cat "$CORRAL_DATA_DIR/qemu-check.pid")" 2>/dev/null || true
    rm -f "$CORRAL_DATA_DIR/qemu-check.pid" "$CORRAL_DATA_DIR/guest-build.log"
    export CORRAL_DRIVER=qemu
    export CORRAL_GUEST_IMAGE="${CORRAL_GUEST_IMAGE:-$PWD/.cache/guest/tiny.json}"
  else
    echo "WARNING: QEMU cannot run here (see $CORRAL_DATA_DIR/guest-build.log); VMs will be SIMULATED" >&2
    echo "WARNING: by the fake driver. Fix QEMU and run make run again for real guests." >&2
    export CORRAL_DRIVER=fake
  fi
fi
driver="$CORRAL_DRIVER"
url="http://$bind:$port"
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
if [ "$driver" = "qemu" ]; then
  # The test guest as an image in the cluster (once): disk, kernel and initrd, checked by sha256.
  if ! .venv/bin/corral --addr "$url" image show tiny >/dev/null 2>&1; then
    .venv/bin/corral --addr "$url" image import tiny --file "$PWD/.cache/guest/tiny.json" >/dev/null \
      || echo "WARNING: could not import the test image (see $CORRAL_DATA_DIR/agent.log)" >&2
  fi
fi
cat <<MSG

  corral is running: node $CORRAL_NAME, data in $CORRAL_DATA_DIR
  API:       $url/api/v1   (OpenAPI: $url/api/v1/openapi.json, docs: $url/api/v1/docs)
  Log:       $CORRAL_DATA_DIR/agent.log
MSG
if [ "$driver" = "fake" ]; then
  cat <<MSG
  Driver:    fake -- VMs are SIMULATED in memory; no guest runs.
MSG
else
  cat <<MSG
  Driver:    qemu -- guests run under QEMU; pool "local" ($CORRAL_DATA_DIR/pools/local) and
             image "tiny" (the test guest: Debian kernel + busybox initramfs) are ready.
MSG
fi
cat <<MSG

  Try, in another terminal:
    export PATH=$PWD/.venv/bin:\$PATH
    corral cluster status
    corral vm create web-1 --image tiny --disk 1G --memory 256 --label tier=web
    corral vm ls
    corral vm console web-1       # the live serial console (type "echo hi"); Ctrl-] leaves
    corral vm log web-1           # its recent output: corral-heartbeat 1, 2, 3...
    corral volume create data-1 --size 1G && corral vm disk attach web-1 data-1

  Ctrl-C stops the agent (the cluster's state stays in $CORRAL_DATA_DIR). Guests keep running
  without it, like on a Proxmox host, and the next make run re-attaches to them: stop them first
  with corral vm stop if you want them down.
MSG
wait $agent
