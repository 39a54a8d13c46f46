#!/usr/bin/env bash
# Install node_exporter (every image) and NVIDIA's DCGM exporter (GPU images) as enabled systemd
# services. The DCGM exporter comes from NVIDIA's CUDA apt repository, which the DLAMI configures;
# its package installs nvidia-dcgm-exporter.service.
#
# Environment (from images/facts.yaml `exporters:`):
#   NODE_EXPORTER_PACKAGE, NODE_EXPORTER_SERVICE
#   DCGM_EXPORTER_PACKAGE, DCGM_EXPORTER_SERVICE
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

require_env NODE_EXPORTER_PACKAGE NODE_EXPORTER_SERVICE DCGM_EXPORTER_PACKAGE DCGM_EXPORTER_SERVICE
export DEBIAN_FRONTEND=noninteractive

apt-get update
apt-get install -y --no-install-recommends "${NODE_EXPORTER_PACKAGE}"
systemctl enable "${NODE_EXPORTER_SERVICE}"
log "${NODE_EXPORTER_PACKAGE} installed, ${NODE_EXPORTER_SERVICE} enabled"

if [[ "$(gpu_count)" -eq 0 ]]; then
  log "no NVIDIA GPU visible: skipping ${DCGM_EXPORTER_PACKAGE} (a GPU-only step)"
  exit 0
fi
candidate="$(apt-cache policy "${DCGM_EXPORTER_PACKAGE}" | awk '/Candidate:/ {print $2}')"
if [[ -z "${candidate}" || "${candidate}" == "(none)" ]]; then
  die "no apt candidate for ${DCGM_EXPORTER_PACKAGE}: the base image should configure NVIDIA's CUDA repository (the DLAMI does)"
fi
apt-get install -y --no-install-recommends "${DCGM_EXPORTER_PACKAGE}"
systemctl enable "${DCGM_EXPORTER_SERVICE}"
log "${DCGM_EXPORTER_PACKAGE} ${candidate} installed, ${DCGM_EXPORTER_SERVICE} enabled"
