#!/usr/bin/env bash
# Create the `vllm` system user and the directories the service writes: the compile/HF cache and
# the staged-weights root.
#
# Environment:
#   VLLM_USER   user (and group) name, default vllm
#   CACHE_DIR   VLLM_CACHE_ROOT for the unit, default /var/cache/vllm (also the user's home)
#   MODELS_DIR  staged weights, default /opt/models
#   ROOT        apply to another root file system (useradd --prefix), default /
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

VLLM_USER="${VLLM_USER:-vllm}"
CACHE_DIR="${CACHE_DIR:-/var/cache/vllm}"
MODELS_DIR="${MODELS_DIR:-/opt/models}"
ROOT="${ROOT:-/}"
ROOT="${ROOT%/}"

[[ "${VLLM_USER}" =~ ^[a-z_][a-z0-9_-]{0,31}$ ]] || die "VLLM_USER '${VLLM_USER}' is not a valid user name"
[[ -f "${ROOT}/etc/passwd" ]] || die "no ${ROOT}/etc/passwd"

if grep -q "^${VLLM_USER}:" "${ROOT}/etc/passwd"; then
  log "user ${VLLM_USER} already exists"
else
  prefix_args=()
  [[ -n "${ROOT}" ]] && prefix_args=(--prefix "${ROOT}")
  useradd "${prefix_args[@]}" --system --user-group --home-dir "${CACHE_DIR}" --no-create-home \
    --shell /usr/sbin/nologin --comment "vLLM inference server" "${VLLM_USER}"
  log "created system user ${VLLM_USER}"
fi

# Numeric ids from the target root's passwd, so this also works for a ROOT that is not the host.
IFS=: read -r _ _ uid gid _ < <(grep "^${VLLM_USER}:" "${ROOT}/etc/passwd")
install -d -m 0750 -o "${uid}" -g "${gid}" "${ROOT}${CACHE_DIR}" "${ROOT}${CACHE_DIR}/huggingface"
install -d -m 0755 -o "${uid}" -g "${gid}" "${ROOT}${MODELS_DIR}"
log "directories ${CACHE_DIR} (0750) and ${MODELS_DIR} (0755) owned by ${VLLM_USER} (${uid}:${gid})"
