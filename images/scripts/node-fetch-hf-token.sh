#!/usr/bin/env bash
# fetch-hf-token: the stack's Hugging Face token from Secrets Manager into a root-only tmpfs file,
# which vllm.service loads as the systemd credential hf-token (HF_TOKEN_PATH points
# huggingface_hub at it). The token never passes through argv, the environment or the journal.
# Installed into the image as /usr/local/libexec/vllm-fleet/fetch-hf-token by
# install-node-tools.sh; vllm-fleet-fetch-hf-token.service (rendered per stack) runs it with:
#   HF_TOKEN_SECRET_ID   the secret's name (vllm-fleet/<stack>/hf-token)
#   AWS_REGION, AWS_DEFAULT_REGION
#   VLLM_FLEET_AWS_ENDPOINT_URL  (tests only) a local stand-in for the AWS APIs (moto); the
#                    image's AWS CLI (2.9) predates the CLI's own AWS_ENDPOINT_URL           the stack's region
#   VLLM_FLEET_RUN_DIR   where to write hf-token (default /run/vllm-fleet)
# The secret is optional: without it (ResourceNotFoundException) the file is empty, vLLM downloads
# anonymously, and the journal says loudly that gated repositories will answer 401.
set -euo pipefail
umask 077

readonly run_dir="${VLLM_FLEET_RUN_DIR:-/run/vllm-fleet}"
readonly attempts="${VLLM_FLEET_FETCH_ATTEMPTS:-20}"
aws_opts=()
[[ -z ${VLLM_FLEET_AWS_ENDPOINT_URL:-} ]] || aws_opts=(--endpoint-url "$VLLM_FLEET_AWS_ENDPOINT_URL")
log() { printf 'fetch-hf-token: %s\n' "$*" >&2; }
[[ -n ${HF_TOKEN_SECRET_ID:-} ]] || { log "HF_TOKEN_SECRET_ID is not set"; exit 1; }

mkdir -p "$run_dir"
tmp="$(mktemp "$run_dir/.hf-token.XXXXXX")"
err="$(mktemp)"
trap 'rm -f "$tmp" "$err"' EXIT
delay=2
for ((attempt = 1; ; attempt++)); do
  # stdout goes only into the 0600 temp file.
  if aws "${aws_opts[@]}" secretsmanager get-secret-value --secret-id "$HF_TOKEN_SECRET_ID" \
    --query SecretString --output text >"$tmp" 2>"$err"; then
    break
  fi
  if grep -q ResourceNotFoundException "$err"; then
    : >"$tmp"
    log "NO HF TOKEN: secret $HF_TOKEN_SECRET_ID does not exist; downloading anonymously" \
      "(a gated repository such as meta-llama/* will answer 401; create the secret to fix)"
    break
  fi
  if ((attempt >= attempts)); then
    log "giving up on secret $HF_TOKEN_SECRET_ID after $attempt attempts: $(tail -n 1 "$err")"
    exit 1
  fi
  log "attempt $attempt/$attempts for secret $HF_TOKEN_SECRET_ID failed; retrying in ${delay}s"
  sleep "$delay"
  delay=$((delay * 2 > 30 ? 30 : delay * 2))
done
# `--output text` ends the value with one newline; huggingface_hub strips it too.
if [[ -s $tmp ]] && ! grep -Eq '^[[:graph:]]+$' "$tmp"; then
  log "secret $HF_TOKEN_SECRET_ID is not one token of visible characters (value not shown)"
  exit 1
fi
chmod 0600 "$tmp"
mv -f "$tmp" "$run_dir/hf-token"
log "wrote $run_dir/hf-token from secret $HF_TOKEN_SECRET_ID"
