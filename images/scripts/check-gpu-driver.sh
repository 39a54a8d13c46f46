#!/usr/bin/env bash
# Check that the base image's NVIDIA driver can run the CUDA major version the pinned torch wheel
# was built for (CUDA minor-version compatibility: CUDA 13.x needs a >= 580 driver).
#
# Environment (the component document passes them from images/facts.yaml):
#   MIN_DRIVER_MAJOR  oldest driver branch for CUDA_MAJOR, e.g. 580
#   CUDA_MAJOR        CUDA major version of the pinned torch wheel, e.g. 13
#   REQUIRE_GPU       true (default): no GPU is an error; false: log and skip (CPU test rootfs)
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

require_env MIN_DRIVER_MAJOR CUDA_MAJOR
REQUIRE_GPU="${REQUIRE_GPU:-true}"

if [[ "$(gpu_count)" -eq 0 ]]; then
  if is_true "${REQUIRE_GPU}"; then
    die "no NVIDIA GPU visible to nvidia-smi: bake on a GPU instance type"
  fi
  log "no NVIDIA GPU visible: skipping the driver check (REQUIRE_GPU=false)"
  exit 0
fi

# One line per GPU; all GPUs share the driver. (No `| head`: under pipefail its early exit
# would kill nvidia-smi with SIGPIPE on a many-GPU host.)
driver="$(nvidia-smi --query-gpu=driver_version --format=csv,noheader)"
driver="${driver%%$'\n'*}"
driver="${driver//[[:space:]]/}"
major="${driver%%.*}"
[[ "${major}" =~ ^[0-9]+$ ]] || die "cannot parse the NVIDIA driver version '${driver}'"
if ((major < MIN_DRIVER_MAJOR)); then
  die "NVIDIA driver ${driver} is older than ${MIN_DRIVER_MAJOR}, the minimum for CUDA ${CUDA_MAJOR}.x (the pinned torch wheel)"
fi
log "NVIDIA driver ${driver} >= ${MIN_DRIVER_MAJOR}: runs CUDA ${CUDA_MAJOR}.x"
