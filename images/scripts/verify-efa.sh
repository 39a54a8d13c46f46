#!/usr/bin/env bash
# Verify the EFA userspace (libfabric with the efa provider) and the AWS OFI NCCL plugin that
# multi-node vLLM needs. The DLAMI base ships both (EFA installer), so the bake only verifies.
#
# Environment (from images/facts.yaml `efa:`):
#   FI_INFO               path of libfabric's fi_info, e.g. /opt/amazon/efa/bin/fi_info
#   LIBFABRIC_LIB_DIR     e.g. /opt/amazon/efa/lib
#   OFI_NCCL_SEARCH_ROOT  where the NCCL net plugin is searched, e.g. /opt/amazon
#   SYSFS_INFINIBAND      default /sys/class/infiniband (EFA devices appear there as efa_N / rdmapN)
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

require_env FI_INFO LIBFABRIC_LIB_DIR OFI_NCCL_SEARCH_ROOT
SYSFS_INFINIBAND="${SYSFS_INFINIBAND:-/sys/class/infiniband}"

[[ -x "${FI_INFO}" ]] || die "EFA userspace missing: no ${FI_INFO}. Bake from the DLAMI base (it ships the EFA installer) or run the EFA installer first"
compgen -G "${LIBFABRIC_LIB_DIR}/libfabric.so*" >/dev/null || die "no libfabric.so in ${LIBFABRIC_LIB_DIR}"
fi_version="$("${FI_INFO}" --version)"
log "libfabric: ${fi_version%%$'\n'*}"

plugin="$(find "${OFI_NCCL_SEARCH_ROOT}" -name 'libnccl-net*.so*' -print -quit 2>/dev/null || true)"
[[ -n "${plugin}" ]] || die "no AWS OFI NCCL plugin (libnccl-net*.so) under ${OFI_NCCL_SEARCH_ROOT}"
log "AWS OFI NCCL plugin: ${plugin}"

# The build instance usually has no EFA interface attached; the fleet's launch template does.
if compgen -G "${SYSFS_INFINIBAND}/*" >/dev/null; then
  "${FI_INFO}" -p efa >/dev/null || die "an RDMA device exists but libfabric's efa provider does not see it"
  log "libfabric's efa provider sees this instance's EFA device"
else
  log "no EFA device on this instance: verified the userspace only"
fi
