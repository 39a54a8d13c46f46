#!/usr/bin/env bash
# fetch-weights: the model's weights from S3 to local disk, before vLLM starts.
# Installed into the image as /usr/local/libexec/vllm-fleet/fetch-weights by
# install-node-tools.sh; vllm-fleet-fetch-weights.service (rendered per stack by
# infra/node/render.py) runs it as the vLLM user, and vllm.service starts only after it succeeds.
#
# Why the AWS CLI's `s3 sync`: it is what the image already carries (fetch-api-key uses it), it
# splits each object into ranged GETs over max_concurrent_requests connections (the parallel
# byte-range download that infra/data/weight_sources.yaml plans S3 at), resumes a partial copy
# after a restart, and needs no hand-written copier. vLLM's own S3 loader (runai_streamer) would
# need the instance role's credentials inside vllm.service, which the unit denies on purpose
# (IPAddressDeny= of the metadata service).
#
# Environment (set by the unit):
#   WEIGHTS_DIR      the local directory the serve argv names as the model
#   WEIGHTS_S3_URI   s3://bucket/prefix/; empty: read the instance tag vllm-fleet:weights-uri
#                    (the Fleet sets it; the default URI names the account, known only at deploy)
#   AWS_REGION, AWS_DEFAULT_REGION
#   VLLM_FLEET_AWS_ENDPOINT_URL  (tests only) a local stand-in for the AWS APIs (moto); the
#                    image's AWS CLI (2.9) predates the CLI's own AWS_ENDPOINT_URL       the stack's region
#   S3_MAX_CONCURRENT_REQUESTS, S3_MULTIPART_CHUNKSIZE   the AWS CLI's transfer settings
#   VLLM_FLEET_IMDS  (tests only) the instance metadata endpoint
# A missing or unreadable source ends the unit with one line naming the URI and the cause; the
# unit does not restart, so vLLM never starts and the node fails its health check once, instead
# of looping.
set -euo pipefail
umask 022

readonly weights_tag="vllm-fleet:weights-uri"
aws_opts=()
[[ -z ${VLLM_FLEET_AWS_ENDPOINT_URL:-} ]] || aws_opts=(--endpoint-url "$VLLM_FLEET_AWS_ENDPOINT_URL")
readonly imds="${VLLM_FLEET_IMDS:-http://169.254.169.254}"
uri="${WEIGHTS_S3_URI:-}"

fail() {
  printf 'fetch-weights: FAILED to fetch weights from %s: %s\n' "${uri:-<no URI>}" "$*" >&2
  exit 1
}
log() { printf 'fetch-weights: %s\n' "$*" >&2; }
# The last line the AWS CLI wrote to stderr: its reason (NoSuchBucket, AccessDenied, ...).
cause() { grep -v '^[[:space:]]*$' "$1" | tail -n 1 || true; }

[[ -n ${WEIGHTS_DIR:-} && ${WEIGHTS_DIR} == /* ]] || fail "WEIGHTS_DIR is not set to an absolute path"

if [[ -z $uri ]]; then
  token="$(curl -fsS --max-time 5 -X PUT -H "X-aws-ec2-metadata-token-ttl-seconds: 300" "$imds/latest/api/token")" ||
    fail "no instance metadata at $imds"
  uri="$(curl -fsS --max-time 5 -H "X-aws-ec2-metadata-token: $token" "$imds/latest/meta-data/tags/instance/$weights_tag")" ||
    fail "instance tag $weights_tag not in instance metadata (are instance metadata tags enabled?)"
fi
[[ $uri =~ ^s3://[a-z0-9][a-z0-9.-]+[a-z0-9](/.*)?$ ]] || fail "not an s3://bucket/prefix/ URI"
[[ $uri == */ ]] || uri="$uri/"

done_marker="$WEIGHTS_DIR/.vllm-fleet-fetched"
if [[ -f $done_marker && "$(<"$done_marker")" == "$uri" ]]; then
  log "weights from $uri already in $WEIGHTS_DIR"
  exit 0
fi

# The CLI's S3 transfer settings live only in its config file ("s3" section of the profile).
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
export AWS_CONFIG_FILE="$work/config"
cat >"$AWS_CONFIG_FILE" <<CONFIG
[default]
retry_mode = standard
max_attempts = 10
s3 =
  max_concurrent_requests = ${S3_MAX_CONCURRENT_REQUESTS:-64}
  multipart_chunksize = ${S3_MULTIPART_CHUNKSIZE:-16MB}
  max_queue_size = 10000
CONFIG

# Listing first tells a missing bucket, a denied role and an empty prefix apart, in one line.
if ! aws "${aws_opts[@]}" s3 ls "$uri" >"$work/listing" 2>"$work/ls.err"; then
  reason="$(cause "$work/ls.err")"
  fail "${reason:-no objects under this prefix}"
fi
mkdir -p "$WEIGHTS_DIR"
rm -f "$done_marker"
log "fetching $uri into $WEIGHTS_DIR"
started=$SECONDS
if ! aws "${aws_opts[@]}" s3 sync "$uri" "$WEIGHTS_DIR" --only-show-errors --no-progress 2>"$work/sync.err"; then
  fail "$(cause "$work/sync.err")"
fi
[[ -f $WEIGHTS_DIR/config.json ]] || fail "no config.json under the prefix: not a model directory"
elapsed=$((SECONDS - started))
bytes="$(du -sb "$WEIGHTS_DIR" | cut -f1)"
printf '%s\n' "$uri" >"$done_marker"
log "fetched $bytes bytes from $uri in ${elapsed} s ($((bytes / (elapsed > 0 ? elapsed : 1) / 1000000)) MB/s)"
