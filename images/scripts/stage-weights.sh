#!/usr/bin/env bash
# Stage model weights into the image at MODELS_DIR/MODEL_NAME, with a sha256 manifest, so nodes
# boot without a download.
#
# Environment:
#   MODEL_NAME        directory name under MODELS_DIR ([A-Za-z0-9._-])
#   WEIGHTS_SOURCE    s3://bucket/prefix/ | hf://org/repo | file:///absolute/dir
#   REVISION          hf:// sources: the 40-hex commit sha (branch or tag names are refused: they move)
#   HF_TOKEN_SECRET_ID  optional Secrets Manager id holding a Hugging Face token (read at bake time,
#                     never written to the image)
#   EXPECTED_MANIFEST_SHA256  optional: fail unless the manifest's sha256 equals it (pins s3/file content)
#   MODELS_DIR        default /opt/models;  OWNER  optional user:group for the staged files
#   HF_CLI            default /opt/vllm/venv/bin/hf (huggingface_hub's CLI, installed with vLLM)
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

require_env MODEL_NAME WEIGHTS_SOURCE
MODELS_DIR="${MODELS_DIR:-/opt/models}"
REVISION="${REVISION:-}"
HF_TOKEN_SECRET_ID="${HF_TOKEN_SECRET_ID:-}"
EXPECTED_MANIFEST_SHA256="${EXPECTED_MANIFEST_SHA256:-}"
OWNER="${OWNER:-}"
HF_CLI="${HF_CLI:-/opt/vllm/venv/bin/hf}"

[[ "${MODEL_NAME}" =~ ^[A-Za-z0-9._-]+$ && "${MODEL_NAME}" != .* ]] || die "MODEL_NAME '${MODEL_NAME}' must be [A-Za-z0-9._-]+"
dest="${MODELS_DIR}/${MODEL_NAME}"
partial="${dest}.partial"
rm -rf "${partial}"
mkdir -p "${partial}"
trap 'rm -rf "${partial}"' EXIT

case "${WEIGHTS_SOURCE}" in
  s3://*)
    if command -v s5cmd >/dev/null 2>&1; then
      s5cmd cp "${WEIGHTS_SOURCE%/}/*" "${partial}/"
    else
      aws s3 cp --recursive --only-show-errors "${WEIGHTS_SOURCE}" "${partial}"
    fi
    ;;
  hf://*)
    repo="${WEIGHTS_SOURCE#hf://}"
    [[ "${repo}" =~ ^[A-Za-z0-9._-]+/[A-Za-z0-9._-]+$ ]] || die "'${WEIGHTS_SOURCE}' is not hf://org/repo"
    if [[ ! "${REVISION}" =~ ^[0-9a-f]{40}$ ]]; then
      die "refusing unpinned revision '${REVISION}' for ${repo}: give the 40-hex commit sha (branches and tags move)"
    fi
    [[ -x "${HF_CLI}" ]] || die "no Hugging Face CLI at ${HF_CLI}"
    if [[ -n "${HF_TOKEN_SECRET_ID}" ]]; then
      HF_TOKEN="$(aws secretsmanager get-secret-value --secret-id "${HF_TOKEN_SECRET_ID}" \
        --query SecretString --output text)"
      export HF_TOKEN
    fi
    "${HF_CLI}" download "${repo}" --revision "${REVISION}" --local-dir "${partial}"
    # The CLI keeps download bookkeeping under .cache in --local-dir; it is not part of the model.
    rm -rf "${partial}/.cache"
    unset HF_TOKEN
    ;;
  file://*)
    src="${WEIGHTS_SOURCE#file://}"
    [[ -d "${src}" ]] || die "no directory ${src}"
    cp -a "${src}/." "${partial}/"
    ;;
  *) die "WEIGHTS_SOURCE '${WEIGHTS_SOURCE}' must start with s3://, hf:// or file://" ;;
esac

[[ -n "$(find "${partial}" -type f -print -quit)" ]] || die "no files came from ${WEIGHTS_SOURCE}"
(cd "${partial}" && find . -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum) >"${partial}.manifest"
mv "${partial}.manifest" "${partial}/MANIFEST.sha256"
digest="$(sha256sum "${partial}/MANIFEST.sha256" | cut -d' ' -f1)"
if [[ -n "${EXPECTED_MANIFEST_SHA256}" && "${digest}" != "${EXPECTED_MANIFEST_SHA256}" ]]; then
  die "manifest sha256 ${digest} differs from EXPECTED_MANIFEST_SHA256 ${EXPECTED_MANIFEST_SHA256}"
fi
printf 'source=%s\nrevision=%s\nmanifest_sha256=%s\n' "${WEIGHTS_SOURCE}" "${REVISION}" "${digest}" \
  >"${partial}/SOURCE"

rm -rf "${dest}"
mv "${partial}" "${dest}"
trap - EXIT
[[ -n "${OWNER}" ]] && chown -R "${OWNER}" "${dest}"
log "staged $(find "${dest}" -type f | wc -l) files ($(du -sh "${dest}" | cut -f1)) at ${dest}, manifest sha256 ${digest}"
