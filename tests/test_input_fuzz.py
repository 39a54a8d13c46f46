"""Fuzzing the edges: generated stack files, config.json documents and hostile paths.

Whatever a user writes, the CLI ends with exit 0, or exit 2 and one line on stderr naming what
to fix; never a traceback. The config.json and path cases run the CLI itself (in-process, as
``main()`` runs); the stack-file cases run the same pipeline ``plan`` runs up to the rendered
node files (config → catalog checks → sizing → serve argv → cloud-init), where every stack-file
value is consumed, since the mocked Pulumi preview after it takes seconds per example.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from infra.config import STACKS_DIR, StackConfig, load_any_stack_file
from infra.errors import FleetError
from infra.plan.build import build_stack_plan
from tests.support.cli_inprocess import assert_refused, run_cli

LLAMA_CONFIG: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "num_attention_heads": 32,
    "num_key_value_heads": 8, "num_hidden_layers": 32, "vocab_size": 128256,
    "intermediate_size": 14336, "max_position_embeddings": 131072, "torch_dtype": "bfloat16",
}
CONFIG_FIELDS = [
    *LLAMA_CONFIG, "head_dim", "num_local_experts", "num_experts", "num_experts_per_tok", "tie_word_embeddings",
    "quantization_config", "rope_scaling", "text_config", "_name_or_path", "model_type", "attention_bias",
]

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, 1, 2, 3, 7, 8, 64, 4096, 2**31, 10**12]),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.sampled_from(["awq", "gptq", "fp8", "compressed-tensors", "bitsandbytes", "yarn", "linear", "-", "--x"]),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.sampled_from(["quant_method", "type", "rope_type", "factor", "config_groups",
                                         "weights", "num_bits", "bits", "x", "hidden_size"]) | st.text(max_size=6),
                        inner, max_size=4),
    ),
    max_leaves=8,
)


def one_line_or_success(run: Any) -> None:
    if run.code == 0:
        return
    assert_refused(run)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    changes=st.dictionaries(st.sampled_from(CONFIG_FIELDS), values, max_size=4),
    dropped=st.lists(st.sampled_from(list(LLAMA_CONFIG)), max_size=2),
    quantization=st.sampled_from([None, "bf16", "fp16", "fp8", "awq", "int3"]),
    max_model_len=st.sampled_from(["256", "4096", "131072", "300000", "0", "-5"]),
)
def test_any_config_json_is_sized_or_refused_in_one_line(
    tmp_path: Path, changes: dict[str, Any], dropped: list[str], quantization: str | None, max_model_len: str
) -> None:
    doc = {**LLAMA_CONFIG, **changes}
    for field in dropped:
        doc.pop(field, None)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(doc))
    args = ["size", "--model", str(path), "--max-model-len", max_model_len, "--json"]
    if quantization is not None:
        args += ["--quantization", quantization]
    run = run_cli(*args)
    one_line_or_success(run)
    if run.code == 0:
        assert json.loads(run.stdout)["instance_type"]


def base_stack() -> dict[str, Any]:
    return copy.deepcopy(yaml.safe_load((STACKS_DIR / "Pulumi.dev-8b.yaml").read_text()))


def stack_keys() -> list[tuple[str, str]]:
    """(file key, section key) for every key the stack schema defines, plus a stray one each."""
    pairs: list[tuple[str, str]] = []
    for name, field in StackConfig.model_fields.items():
        if name in ("stack", "region", "tags"):
            continue
        annotation = field.annotation
        for sub_name, sub in getattr(annotation, "model_fields", {}).items():
            pairs.append((f"vllm-fleet:{name}", sub.alias or sub_name))
        pairs.append((f"vllm-fleet:{name}", "notAKey"))
    return pairs


STACK_KEYS = stack_keys()
TOP_KEYS = ["aws:region", "vllm-fleet:tags", "vllm-fleet:model", "vllm-fleet:serving", "vllm-fleet:bake",
            "vllm-fleet:nope", "other:key"]


def plan_like_cli(stacks: Path) -> None:
    """What ``plan`` does before its mocked preview; FleetError is the CLI's one-line exit 2."""
    try:
        config = load_any_stack_file("fuzz", stacks)
        if isinstance(config, StackConfig):
            build_stack_plan(config, validate=False)
    except FleetError as err:
        assert "\n" not in str(err), str(err)
        assert str(err).strip(), "an error says something"


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    section_changes=st.lists(st.tuples(st.sampled_from(STACK_KEYS), values), max_size=3),
    top_changes=st.lists(st.tuples(st.sampled_from(TOP_KEYS), values), max_size=2),
    deleted=st.lists(st.sampled_from(STACK_KEYS), max_size=2),
)
def test_any_stack_file_plans_or_is_refused_in_one_line(
    tmp_path: Path, section_changes: list[Any], top_changes: list[Any], deleted: list[Any]
) -> None:
    doc = base_stack()
    config = doc["config"]
    for (section, key), value in section_changes:
        if not isinstance(config.get(section), dict):
            config[section] = {}
        config[section][key] = value
    for key, value in top_changes:
        config[key] = value
    for section, key in deleted:
        if isinstance(config.get(section), dict):
            config[section].pop(key, None)
    stacks = tmp_path / "stacks"
    stacks.mkdir(exist_ok=True)
    (stacks / "Pulumi.fuzz.yaml").write_text(yaml.safe_dump(doc))
    plan_like_cli(stacks)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_any_bytes_as_a_stack_file(tmp_path: Path, raw: bytes) -> None:
    stacks = tmp_path / "stacks"
    stacks.mkdir(exist_ok=True)
    (stacks / "Pulumi.fuzz.yaml").write_bytes(raw)
    plan_like_cli(stacks)


def test_generated_stack_files_reach_the_full_cli(tmp_path: Path) -> None:
    """A few mutated stack files through the whole ``plan`` (preview and policy pack included)."""
    cases = [
        ("vllm-fleet:capacity", "maxReplicas", 1),  # too little room for a rolling replacement
        ("vllm-fleet:serving", "shutdownTimeoutS", 3600),
        ("vllm-fleet:endpoint", "type", "nlb"),
    ]
    for i, (section, key, value) in enumerate(cases):
        doc = base_stack()
        doc["config"][section][key] = value
        stacks = tmp_path / f"s{i}"
        stacks.mkdir()
        (stacks / "Pulumi.fuzz.yaml").write_text(yaml.safe_dump(doc))
        run = run_cli("plan", "fuzz", "--stacks-dir", stacks, "--out", tmp_path / f"out{i}", "--json")
        one_line_or_success(run)


# --- hostile paths, for every path the CLI takes -------------------------------------------------
def hostile_paths(tmp_path: Path) -> dict[str, Path]:
    a_file = tmp_path / "a-file"
    a_file.write_text("not a directory")
    fifo = tmp_path / "a-fifo"
    os.mkfifo(fifo)
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    binary = tmp_path / "binary.json"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    empty_dir = tmp_path / "empty-dir"
    empty_dir.mkdir()
    full_dir = tmp_path / "full-dir"
    full_dir.mkdir()
    (full_dir / "notes.txt").write_text("someone else's")
    return {
        "missing": tmp_path / "missing" / "deeper",
        "file": a_file,
        "under-a-file": a_file / "below",
        "fifo": fifo,
        "symlink-loop": loop,
        "too-long": tmp_path / ("x" * 300),
        "binary": binary,
        "empty-dir": empty_dir,
        "full-dir": full_dir,
        "proc": Path("/proc/self/mem"),
    }


# Every command and option that takes a path; exit 0 is allowed where the path is usable.
PATH_ARGS = [
    ("size", ["size", "--max-model-len", "4096", "--quantization", "bf16", "--model", "{}"]),
    ("plan --out", ["plan", "dev-8b", "--out", "{}"]),
    ("plan --stacks-dir", ["plan", "dev-8b", "--stacks-dir", "{}"]),
    ("preflight --stacks-dir", ["preflight", "dev-8b", "--stacks-dir", "{}"]),
    ("rotate-key --stacks-dir", ["rotate-key", "dev-8b", "--stacks-dir", "{}"]),
]


@pytest.mark.parametrize(("what", "template"), PATH_ARGS, ids=[p[0] for p in PATH_ARGS])
def test_cli_commands_refuse_hostile_paths_in_one_line(tmp_path: Path, what: str, template: list[str]) -> None:
    paths = hostile_paths(tmp_path)
    if what != "plan --out":
        paths["root"] = Path("/")  # read-only uses only: --out / is the full-dir case
    for name, path in paths.items():
        if what == "plan --out" and name in ("missing", "empty-dir"):
            continue  # usable: a plan writes there (checked in tests/test_first_hour.py)
        args = [str(path) if a == "{}" else a for a in template]
        run = run_cli(*args)
        assert run.code == 2, (what, name, run.code, run.stderr, run.stdout[-500:])
        assert_refused(run)
    assert sorted(p.name for p in (tmp_path / "full-dir").iterdir()) == ["notes.txt"], "nothing written"
