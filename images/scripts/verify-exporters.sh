#!/usr/bin/env bash
# Verify the exporters: enabled (validate phase, build instance) or serving metrics (test phase,
# an instance booted from the new AMI).
#
# Environment:
#   MODE                     enabled | serving
#   NODE_EXPORTER_SERVICE, NODE_EXPORTER_PORT, DCGM_EXPORTER_SERVICE, DCGM_EXPORTER_PORT
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

require_env MODE NODE_EXPORTER_SERVICE NODE_EXPORTER_PORT DCGM_EXPORTER_SERVICE DCGM_EXPORTER_PORT

# check_exporter SERVICE PORT METRIC_PREFIX
check_exporter() {
  local service="$1" port="$2" metric="$3"
  case "${MODE}" in
    enabled)
      systemctl is-enabled --quiet "${service}" || die "${service} is not enabled"
      log "${service} is enabled"
      ;;
    serving)
      systemctl is-active --quiet "${service}" || die "${service} is not running"
      local body
      body="$(curl -fsS --max-time 10 "http://127.0.0.1:${port}/metrics")" || die "no metrics on 127.0.0.1:${port}"
      grep -q "^${metric}" <<<"${body}" || die "127.0.0.1:${port}/metrics has no ${metric}* series"
      log "${service} serves ${metric}* metrics on port ${port}"
      ;;
    *) die "MODE must be enabled or serving, not '${MODE}'" ;;
  esac
}

check_exporter "${NODE_EXPORTER_SERVICE}" "${NODE_EXPORTER_PORT}" node_
if [[ "$(gpu_count)" -eq 0 ]]; then
  log "no NVIDIA GPU visible: not checking ${DCGM_EXPORTER_SERVICE} (a GPU-only service)"
  exit 0
fi
check_exporter "${DCGM_EXPORTER_SERVICE}" "${DCGM_EXPORTER_PORT}" DCGM_FI_
