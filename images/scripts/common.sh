#!/usr/bin/env bash
# Helpers shared by the bake scripts. Sourced, never run: each script sets -euo pipefail itself.

log() { printf '[vllm-fleet-bake] %s\n' "$*" >&2; }

die() {
  log "ERROR: $*"
  exit 1
}

# Fail with the variable's name when any of the named variables is unset or empty.
require_env() {
  local name
  for name in "$@"; do
    [[ -n "${!name:-}" ]] || die "required variable ${name} is empty"
  done
}

is_true() {
  case "${1,,}" in
    true | 1 | yes) return 0 ;;
    false | 0 | no | "") return 1 ;;
    *) die "not a boolean: '$1' (use true or false)" ;;
  esac
}

# version_ge A B: true when version A >= version B (dotted numbers, compared piecewise).
version_ge() {
  local lowest
  lowest="$(printf '%s\n%s\n' "$1" "$2" | sort -V)"
  [[ "${lowest%%$'\n'*}" == "$2" ]]
}

# Number of NVIDIA GPUs the driver shows; 0 when there is no driver or no GPU.
gpu_count() {
  if ! command -v nvidia-smi >/dev/null 2>&1; then
    echo 0
    return
  fi
  local listing
  listing="$(nvidia-smi --list-gpus 2>/dev/null || true)"
  grep -c '^GPU [0-9]' <<<"${listing}" || true
}
