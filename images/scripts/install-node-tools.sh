#!/usr/bin/env bash
# Install the node's static helper programs into LIBEXEC (default /usr/local/libexec/vllm-fleet):
# the scripts are the same on every stack, so they live in the image and each stack's user-data
# carries only the units that configure them (EC2 takes at most 16 KB of user-data).
#   node-fetch-weights.sh   → fetch-weights    (weightsSource s3: the weights onto local disk)
#   node-fetch-hf-token.sh  → fetch-hf-token   (weightsSource huggingface: the Hub token)
#   node-scaling-signal.sh  → scaling-signal   (the scaling gauges to CloudWatch, scale-in protection)
#
# Environment:
#   LIBEXEC   install directory, default /usr/local/libexec/vllm-fleet
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

LIBEXEC="${LIBEXEC:-/usr/local/libexec/vllm-fleet}"
here="$(dirname "${BASH_SOURCE[0]}")"
command -v aws >/dev/null 2>&1 || die "the node tools call the AWS CLI; install it first"
command -v curl >/dev/null 2>&1 || die "the node tools call curl; install it first"
install -d -m 0755 "${LIBEXEC}"
for tool in fetch-weights fetch-hf-token scaling-signal; do
  install -m 0755 "${here}/node-${tool}.sh" "${LIBEXEC}/${tool}"
  bash -n "${LIBEXEC}/${tool}" || die "${LIBEXEC}/${tool}: not valid bash"
  log "installed ${LIBEXEC}/${tool}"
done
