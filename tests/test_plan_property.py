"""Every plan the planner can return renders: `vllm-fleet plan` over generated stacks either
refuses in one line with exit 2 (the planner's own refusal, or one naming the stack key to
change), or writes artifacts that passed vLLM's parser, the node spec's checks and the
policy pack.

The stacks are generated: a catalog model or a config.json (random Llama/Qwen2-shaped
architectures, named by a repo id), each quantization, contexts, concurrencies, workloads
and instance-type lists. A FleetError from anything after the planner (rendering, node spec,
policies) is a bug, not a refusal: that is how the gang's Ray-wait timeout was found.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from infra.cli.app import main
from infra.config import load_stack_file
from infra.errors import FleetError
from infra.facts.catalog import default_catalog
from infra.plan.planner import make_plan
from infra.plan.stack import VALIDATED, sizing_request

CATALOG = default_catalog()
FAMILIES = sorted({it.family for it in CATALOG.instances.values()})


@st.composite
def config_json(draw: st.DrawFn) -> dict[str, Any]:
    """A decoder-only architecture vLLM and the planner accept: heads divide hidden_size, KV
    heads divide heads."""
    heads = draw(st.sampled_from([16, 32, 40, 64]))
    head_dim = draw(st.sampled_from([64, 128]))
    kv_heads = draw(st.sampled_from([h for h in (1, 2, 4, 8, heads) if heads % h == 0]))
    arch = draw(st.sampled_from(["LlamaForCausalLM", "Qwen2ForCausalLM"]))
    hidden = heads * head_dim
    return {
        "_name_or_path": f"generated-org/model-{hidden}x{heads}",
        "architectures": [arch],
        "model_type": "qwen2" if arch == "Qwen2ForCausalLM" else "llama",
        "hidden_size": hidden,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "num_hidden_layers": draw(st.integers(8, 64)),
        "intermediate_size": hidden * draw(st.sampled_from([3, 4])),
        "vocab_size": draw(st.sampled_from([32000, 128256, 152064])),
        "max_position_embeddings": draw(st.sampled_from([8192, 32768, 131072])),
        "torch_dtype": "bfloat16",
    }


@st.composite
def stack_doc(draw: st.DrawFn) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """A fleet stack file's config mapping, and the config.json it names (if any)."""
    doc = draw(st.one_of(st.none(), config_json()))
    if doc is None:
        name = draw(st.sampled_from(sorted(CATALOG.models)))
        model: dict[str, Any] = {"catalog": name}
    else:
        model = {"repo": doc["_name_or_path"], "configJson": "CONFIG_JSON"}  # the test writes it
    workload: dict[str, Any] = draw(st.sampled_from([
        {},
        {"inputTokens": 512, "outputTokens": 128, "itlP95Ms": 100},
        {"inputTokens": 1024, "outputTokens": 256, "itlP95Ms": 40, "peakRequestsPerS": 20},
        {"inputTokens": 2048, "outputTokens": 512, "concurrentUsers": 50},
        {"inputTokens": 1024, "outputTokens": 256, "ttftP95Ms": 2500, "itlP95Ms": 100},
    ]))
    config = {
        "aws:region": "us-east-1",
        "vllm-fleet:model": model,
        "vllm-fleet:serving": {
            "quantization": draw(st.sampled_from(sorted(CATALOG.quantizations))),
            "maxModelLen": draw(st.sampled_from([4096, 8192, 16384, 32768])),
            "concurrency": draw(st.integers(1, 32)),
        },
        "vllm-fleet:capacity": {
            "minReplicas": 1,
            # Room for one more node to replace one (a refusal otherwise), up to 8 replicas a node.
            "maxReplicas": draw(st.sampled_from([2, 9, 17])),
            "instanceTypes": draw(st.lists(st.sampled_from(FAMILIES), min_size=1, max_size=3, unique=True)),
            "maxNodesPerReplica": draw(st.integers(1, 4)),
        },
        "vllm-fleet:workload": workload,
        "vllm-fleet:image": {"amiId": "ami-0a1b2c3d4e5f60718"},
    }
    return config, doc


# The case: Qwen2.5-32B-AWQ from its config.json at 32k × 16 on g5 only is a gang of
# three g5.12xlarge (TP 4 × PP 3) whose start timeout (660 s) was below the Ray wait (900 s).
QWEN_32B_AWQ = {
    "_name_or_path": "Qwen/Qwen2.5-32B-Instruct-AWQ", "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
    "hidden_size": 5120, "num_attention_heads": 40, "num_key_value_heads": 8, "num_hidden_layers": 64,
    "vocab_size": 152064, "intermediate_size": 27648, "max_position_embeddings": 32768, "torch_dtype": "float16",
}
GANG = ({
    "aws:region": "us-east-1",
    "vllm-fleet:model": {"repo": QWEN_32B_AWQ["_name_or_path"], "configJson": "CONFIG_JSON"},
    "vllm-fleet:serving": {"quantization": "awq", "maxModelLen": 32768, "concurrency": 16},
    "vllm-fleet:capacity": {"minReplicas": 1, "maxReplicas": 2, "instanceTypes": ["g5"], "maxNodesPerReplica": 4},
    "vllm-fleet:workload": {},
    "vllm-fleet:image": {"amiId": "ami-0a1b2c3d4e5f60718"},
}, QWEN_32B_AWQ)


@example(stack=GANG)
@settings(max_examples=20, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(stack=stack_doc())
def test_plan_refuses_in_one_line_or_renders(
    stack: tuple[dict[str, Any], dict[str, Any] | None], tmp_path_factory: pytest.TempPathFactory,
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    config, doc = stack
    root = tmp_path_factory.mktemp("stack")
    stacks = root / "stacks"
    stacks.mkdir()
    if doc is not None:
        (root / "model").mkdir()
        (root / "model" / "config.json").write_text(json.dumps(doc))
        config = {**config, "vllm-fleet:model": {**config["vllm-fleet:model"], "configJson": str(root / "model" / "config.json")}}
    (stacks / "Pulumi.gen.yaml").write_text(yaml.safe_dump({"config": config}))
    out = root / "out"
    # What the planner decides, apart from the CLI: a refusal must come from here.
    try:
        planned: str | None = None
        plan = make_plan(sizing_request(load_stack_file("gen", stacks)))
    except FleetError as err:
        planned = str(err)
    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", ["vllm-fleet", "plan", "gen", "--stacks-dir", str(stacks), "--out", str(out), "--json"])
    try:
        main()
        code = 0
    except SystemExit as exit_:
        code = int(exit_.code or 0)
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    if planned is not None:
        assert code == 2, captured.err
        assert lines == [f"vllm-fleet: error: {planned}"], captured.err
        assert not out.exists()
        event("planner: " + planned[:70])
        return
    if code == 2:
        # A refusal after the planner chose must still be the user's to fix: one line naming a
        # stack key (e.g. maxReplicas too low to replace a node). Anything else is a plan the
        # planner returned that does not render.
        assert len(lines) == 1 and lines[0].startswith("vllm-fleet: error: vllm-fleet:"), (
            f"the planner chose {plan.layout} but plan failed: {captured.err.strip()}"
        )
        event("refused: " + lines[0][19:90])
        return
    assert code == 0, f"the planner chose {plan.layout} but plan failed: {captured.err.strip()}"
    summary = json.loads(captured.out)
    assert summary["argv_validation"] == VALIDATED and summary["policy_violations"] == 0
    assert summary["max_num_seqs"] == plan.max_num_seqs and summary["instance_type"] == plan.layout.instance_type
    if doc is not None:
        assert summary["model"] == doc["_name_or_path"]
    files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert {"plan.json", "vllm-serve.argv", "resources.json", "policy-config.json"} <= files
    for rung in plan.fallbacks:
        user_data = (out / "user-data" / f"{rung.layout.instance_type}.yaml").read_text()
        assert user_data.startswith("#cloud-config") and yaml.safe_load(user_data)
    argv = (out / "vllm-serve.argv").read_text().split()
    assert argv[argv.index("--max-num-seqs") + 1] == str(plan.max_num_seqs)
    assert argv[argv.index("--max-num-batched-tokens") + 1] == str(plan.max_num_batched_tokens)
    if stack == GANG:
        assert plan.layout.nodes_per_replica == 3
    event(f"rendered: {plan.layout.nodes_per_replica} node(s) per replica")
