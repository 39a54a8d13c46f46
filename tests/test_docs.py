"""The operator docs stay true: the key reference is what the models generate, every relative
link resolves, and the procedures' code does what the docs say."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from infra.cli.stack_reference import render_stack_reference
from infra.config import parse_stack_config
from infra.plan.build import build_stack_plan

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")])
# [text](target) outside code spans; images too.
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def test_stack_key_reference_is_generated_from_the_models() -> None:
    current = (ROOT / "docs" / "stack-keys.md").read_text(encoding="utf-8")
    assert current == render_stack_reference(), (
        "docs/stack-keys.md is stale: run `python -m infra.cli.stack_reference > docs/stack-keys.md`"
    )


@pytest.mark.parametrize("doc", DOCS, ids=[p.name for p in DOCS])
def test_relative_links_resolve(doc: Path) -> None:
    text = re.sub(r"```.*?```", "", doc.read_text(encoding="utf-8"), flags=re.DOTALL)
    text = re.sub(r"`[^`\n]*`", "", text)  # code spans: regexes and paths, not links
    for target in LINK.findall(text):
        if re.match(r"^[a-z]+:", target) or target.startswith("#"):
            continue
        path = (doc.parent / target.split("#", 1)[0]).resolve()
        assert path.exists(), f"{doc.relative_to(ROOT)}: link {target} does not resolve"
        assert ROOT in path.parents or path == ROOT, f"{doc.relative_to(ROOT)}: link {target} leaves the repository"


@pytest.mark.parametrize("doc", DOCS, ids=[p.name for p in DOCS])
def test_no_paths_outside_the_repository(doc: Path) -> None:
    text = doc.read_text(encoding="utf-8")
    assert "/work/" not in text and "shared/reference" not in text, doc.name


def _code_block(doc: str, opener: str) -> str:
    text = (ROOT / "docs" / doc).read_text(encoding="utf-8")
    start = text.index(opener) + len(opener)
    return text[start:].split("\n```", 1)[0]


def test_byo_model_stack_from_the_docs_plans(tmp_path: Path) -> None:
    """A new user's stack, exactly as docs/byo-model.md writes it, with its placeholders filled."""
    stack_yaml = _code_block("byo-model.md", "```yaml\n")
    config_json = tmp_path / "models" / "acme-chat-32b" / "config.json"
    config_json.parent.mkdir(parents=True)
    config_json.write_text(json.dumps({
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 5120,
        "num_attention_heads": 40, "num_key_value_heads": 8, "num_hidden_layers": 64, "vocab_size": 152064,
        "intermediate_size": 27648, "max_position_embeddings": 32768,
        "quantization_config": {"bits": 4, "group_size": 128, "quant_method": "awq", "version": "gemm"},
    }))
    filled = (stack_yaml.replace("<account>", "123456789012").replace("<id>", "0a1b2c3d")
              .replace("<topic>", "alerts").replace("models/acme-chat-32b", str(config_json.parent)))
    config = parse_stack_config("acme-chat", yaml.safe_load(filled)["config"])
    stack_plan = build_stack_plan(config, validate=False)
    assert stack_plan.plan.request.quantization == "awq"
    assert stack_plan.plan.request.model_name == "acme/chat-32b-awq"


def test_journal_batches_script_respects_put_log_events_limits(tmp_path: Path) -> None:
    script = _code_block("debug-node.md", "cat > /tmp/journal-batches.py <<'PY'\n").rsplit("\nPY", 1)[0]
    (tmp_path / "batches.py").write_text(script.replace("/tmp/journal-batch-", f"{tmp_path}/journal-batch-"))
    lines = [
        json.dumps({"__REALTIME_TIMESTAMP": str(1_700_000_000_000_000 + i * 1000), "_SYSTEMD_UNIT": "vllm.service",
                    "MESSAGE": ("é" * (i % 500)) if i % 9 else [104, 105, 255]})
        for i in range(23_000)
    ] + [json.dumps({"__REALTIME_TIMESTAMP": "1700000100000000", "SYSLOG_IDENTIFIER": "big", "MESSAGE": "x" * 400_000})]
    run = subprocess.run([sys.executable, str(tmp_path / "batches.py")], input="\n".join(lines) + "\n",
                         capture_output=True, text=True, check=True)
    batches = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("journal-batch-*.json"))]
    assert sum(map(len, batches)) == len(lines), run.stdout
    for events in batches:
        assert len(events) <= 10_000
        assert sum(len(e["message"].encode()) + 26 for e in events) <= 1_048_576
        assert all(len(e["message"].encode()) <= 256 * 1024 for e in events)
        stamps = [e["timestamp"] for e in events]
        assert stamps == sorted(stamps)
    assert any("hi\ufffd" in e["message"] for e in batches[0]), "byte-array messages are decoded"
