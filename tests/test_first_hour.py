"""A platform engineer's first hour (issue #17): every bad input is one line naming the key,
the value and what is allowed (exit 2, nothing created); config.json is honoured; extraArgs
only add; plans say what their prices are; defaults are safe or printed; the CLI behaves
like other CLIs.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from infra.cli.stack_report import defaults_in_effect, stack_fleet_cost
from infra.config import PLANNER_OWNED_FLAGS, STACKS_DIR, load_stack_file, parse_stack_config
from infra.errors import FleetError
from infra.facts.catalog import default_catalog
from infra.plan.build import build_stack_plan
from infra.plan.capacity import capacity_layout
from infra.plan.node.serve_args import build_serve_argv
from infra.plan.planner import Layout, SizingRequest, ladder_explanation, make_plan
from infra.plan.stack import sizing_request
from tests.support.cli_inprocess import assert_refused, run_cli

ROOT = Path(__file__).resolve().parent.parent
LLAMA_8B_CONFIG: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "num_attention_heads": 32,
    "num_key_value_heads": 8, "num_hidden_layers": 32, "vocab_size": 128256,
    "intermediate_size": 14336, "max_position_embeddings": 131072,
}
# Qwen2.5-32B-Instruct-AWQ's config.json, the fields the planner reads.
QWEN_32B_AWQ_CONFIG: dict[str, Any] = {
    "_name_or_path": "Qwen/Qwen2.5-32B-Instruct-AWQ", "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2", "hidden_size": 5120, "num_attention_heads": 40, "num_key_value_heads": 8,
    "num_hidden_layers": 64, "vocab_size": 152064, "intermediate_size": 27648,
    "max_position_embeddings": 32768,
    "quantization_config": {"bits": 4, "group_size": 128, "quant_method": "awq", "version": "gemm",
                            "zero_point": True},
}


def write_json(path: Path, doc: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))
    return path


def base_stack() -> dict[str, Any]:
    return copy.deepcopy(yaml.safe_load((STACKS_DIR / "Pulumi.dev-8b.yaml").read_text()))


def write_stack(tmp_path: Path, doc: dict[str, Any], name: str = "t") -> Path:
    stacks = tmp_path / "stacks"
    stacks.mkdir(exist_ok=True)
    (stacks / f"Pulumi.{name}.yaml").write_text(yaml.safe_dump(doc))
    return stacks


def plan_refusal(tmp_path: Path, doc: dict[str, Any], *needles: str) -> str:
    stacks = write_stack(tmp_path, doc)
    out = tmp_path / "out"
    line = assert_refused(run_cli("plan", "t", "--stacks-dir", stacks, "--out", out), *needles)
    assert not out.exists(), "a refused plan creates nothing"
    return line


def size(*args: str | Path) -> Any:
    return run_cli("size", *args)


# --- tracebacks that became one line ------------------------------------------------------------
def test_zero_attention_heads_names_the_field(tmp_path: Path) -> None:
    cfg = write_json(tmp_path / "m" / "config.json", {**LLAMA_8B_CONFIG, "num_attention_heads": 0})
    assert_refused(size("--model", cfg, "--quantization", "bf16", "--max-model-len", "4096"),
                   "--model", "num_attention_heads = 0", "positive integer")


def test_model_directory_is_read_for_its_config_json(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_refused(size("--model", empty, "--quantization", "bf16", "--max-model-len", "4096"),
                   "--model", "directory without a config.json")
    write_json(tmp_path / "my-model" / "config.json", LLAMA_8B_CONFIG)
    run = size("--model", tmp_path / "my-model", "--quantization", "bf16", "--max-model-len", "4096", "--json")
    assert run.code == 0, run.stderr
    assert json.loads(run.stdout)["model"] == "my-model"


def test_stack_file_that_is_not_utf8(tmp_path: Path) -> None:
    stacks = tmp_path / "stacks"
    stacks.mkdir()
    (stacks / "Pulumi.t.yaml").write_bytes(b"config:\n  aws:region: us-east-1\xff\xfe\n")
    assert_refused(run_cli("plan", "t", "--stacks-dir", stacks), "not UTF-8")


def test_out_that_is_an_existing_file(tmp_path: Path) -> None:
    blocker = tmp_path / "plan-output"
    blocker.write_text("keep me")
    assert_refused(run_cli("plan", "dev-8b", "--out", blocker), "--out", "not a directory")
    assert blocker.read_text() == "keep me"
    assert_refused(run_cli("plan", "dev-8b", "--out", blocker / "sub"), "--out", "is a file")


# --- messages that name the key -----------------------------------------------------------------
@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [("hidden_size", "abc", 'hidden_size = "abc"'), ("num_hidden_layers", -4, "num_hidden_layers = -4"),
     ("num_key_value_heads", 7, "num_key_value_heads = 7"), ("vocab_size", True, "vocab_size = true"),
     ("tie_word_embeddings", "yes", "tie_word_embeddings")],
)
def test_config_json_field_errors_name_the_field(tmp_path: Path, field: str, value: Any, needle: str) -> None:
    cfg = write_json(tmp_path / "config.json", {**LLAMA_8B_CONFIG, field: value})
    assert_refused(size("--model", cfg, "--quantization", "bf16", "--max-model-len", "4096"), "--model", needle)


def test_stack_config_json_errors_name_the_stack_key(tmp_path: Path) -> None:
    doc = base_stack()
    doc["config"]["vllm-fleet:model"] = {
        "repo": "acme/llama-8b", "revision": "main", "architecture": {**LLAMA_8B_CONFIG, "hidden_size": "abc"},
    }
    plan_refusal(tmp_path, doc, "vllm-fleet:model.architecture", 'hidden_size = "abc"')


def test_extra_args_error_names_the_stack_key(tmp_path: Path) -> None:
    doc = base_stack()
    doc["config"]["vllm-fleet:serving"]["extraArgs"] = ["--enable-chunked-prefill", "--api-key", "x"]
    plan_refusal(tmp_path, doc, 'vllm-fleet:serving.extraArgs[1] = "--api-key"', "Secrets Manager")


def test_stack_name_rule_says_it_starts_with_a_letter() -> None:
    assert_refused(run_cli("plan", "9lives"), "start with a letter")


# --- accepted before, but wrong -----------------------------------------------------------------
@pytest.mark.parametrize(
    ("extra", "key"),
    [(["--tensor-parallel-size", "2"], "capacity.instanceTypes"), (["-tp", "2"], "capacity.instanceTypes"),
     (["--max_model_len=4096"], "serving.maxModelLen"), (["--max-num-seqs", "3"], "serving.concurrency"),
     (["--quantization", "fp8"], "serving.quantization"), (["--port", "9000"], "serving.port")],
)
def test_extra_args_cannot_override_the_planner(tmp_path: Path, extra: list[str], key: str) -> None:
    doc = base_stack()
    doc["config"]["vllm-fleet:serving"]["extraArgs"] = extra
    plan_refusal(tmp_path, doc, "vllm-fleet:serving.extraArgs[0]", key, "may only add")


def test_every_flag_the_planner_writes_is_owned() -> None:
    """extraArgs' refusal list cannot drift from what build_serve_argv writes."""
    for stack in ("dev-8b", "prod-405b"):
        stack_plan = build_stack_plan(load_stack_file(stack), validate=False)
        written = {t for t in build_serve_argv(stack_plan.config, stack_plan.plan) if t.startswith("-")}
        assert written <= set(PLANNER_OWNED_FLAGS), written - set(PLANNER_OWNED_FLAGS)


def test_awq_checkpoint_is_sized_as_awq(tmp_path: Path) -> None:
    cfg = write_json(tmp_path / "qwen" / "config.json", QWEN_32B_AWQ_CONFIG)
    assert_refused(size("--model", cfg, "--quantization", "fp16", "--max-model-len", "8192"),
                   '--quantization = "fp16"', "quantization_config for awq")
    run = size("--model", cfg, "--max-model-len", "8192", "--json")
    assert run.code == 0, run.stderr
    doc = json.loads(run.stdout)
    assert doc["quantization"] == "awq"
    assert doc["model"] == "Qwen/Qwen2.5-32B-Instruct-AWQ"  # the name is the repo id config.json records
    assert 17e9 < doc["weights_bytes"] < 21e9  # about 19 GB, not the 65 GB of fp16


def test_stack_quantization_must_match_the_checkpoint(tmp_path: Path) -> None:
    doc = base_stack()
    write_json(tmp_path / "models" / "qwen" / "config.json", QWEN_32B_AWQ_CONFIG)
    doc["config"]["vllm-fleet:model"] = {"repo": "Qwen/Qwen2.5-32B-Instruct-AWQ", "revision": "main",
                                          "configJson": str(tmp_path / "models" / "qwen")}
    doc["config"]["vllm-fleet:capacity"]["instanceTypes"] = ["g6e", "p4de"]
    plan_refusal(tmp_path, doc, 'vllm-fleet:serving.quantization = "bf16"', "awq")


def test_rope_scaling_sets_the_usable_context(tmp_path: Path) -> None:
    linear = {**LLAMA_8B_CONFIG, "max_position_embeddings": 4096, "rope_scaling": {"type": "linear", "factor": 4.0}}
    cfg = write_json(tmp_path / "linear" / "config.json", linear)
    run = size("--model", cfg, "--quantization", "bf16", "--max-model-len", "16384", "--json")
    assert run.code == 0, run.stderr
    assert_refused(size("--model", cfg, "--quantization", "bf16", "--max-model-len", "16385"),
                   "--max-model-len = 16385", "limit 16384", "rope_scaling linear factor 4")
    # vLLM 0.32.0 takes a YaRN model's max_position_embeddings as already scaled: the refusal says so.
    yarn = {**LLAMA_8B_CONFIG, "max_position_embeddings": 32768,
            "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}}
    cfg = write_json(tmp_path / "yarn" / "config.json", yarn)
    assert_refused(size("--model", cfg, "--quantization", "bf16", "--max-model-len", "131072"),
                   "limit 32768", "rope_scaling yarn", "raise max_position_embeddings")


def test_spot_on_demand_base_above_max_replicas(tmp_path: Path) -> None:
    doc = base_stack()
    doc["config"]["vllm-fleet:capacity"].update(market="spot", onDemandBase=3, maxReplicas=2)
    plan_refusal(tmp_path, doc, "vllm-fleet:capacity", "onDemandBase 3 exceeds maxReplicas 2")


@pytest.mark.parametrize(
    ("section", "key", "value", "needles"),
    [("vllm-fleet:serving", "concurrency", True, ("vllm-fleet:serving.concurrency = true", "whole number")),
     ("vllm-fleet:serving", "maxModelLen", "8192", ('maxModelLen = "8192"', "whole number")),
     ("vllm-fleet:endpoint", "internal", "yes", ("vllm-fleet:endpoint.internal",))],
)
def test_no_type_coercion(tmp_path: Path, section: str, key: str, value: Any, needles: tuple[str, ...]) -> None:
    doc = base_stack()
    doc["config"][section][key] = value
    plan_refusal(tmp_path, doc, *needles)


def test_duplicate_yaml_key_is_refused(tmp_path: Path) -> None:
    stacks = tmp_path / "stacks"
    stacks.mkdir()
    text = (STACKS_DIR / "Pulumi.dev-8b.yaml").read_text().replace(
        "    concurrency: 8\n", "    concurrency: 8\n    concurrency: 64\n")
    (stacks / "Pulumi.t.yaml").write_text(text)
    assert_refused(run_cli("plan", "t", "--stacks-dir", stacks), "'concurrency' is given twice")


def test_duplicate_config_json_key_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(LLAMA_8B_CONFIG)[:-1] + ', "hidden_size": 8192}')
    assert_refused(size("--model", path, "--quantization", "bf16", "--max-model-len", "4096"),
                   "'hidden_size' is given twice")


@pytest.mark.parametrize(
    ("mutate", "needles"),
    [(lambda c: c["vllm-fleet:network"].update(mode="existing", vpcId="vpc-0a1b2c3d4e5f60718",
                                               privateSubnetIds=["sub-1", "sub-2"]),
      ("vllm-fleet:network.privateSubnetIds[0]", "sub-1")),
     (lambda c: c.update({"aws:region": "us-east-9"}), ('aws:region = "us-east-9"', "did you mean")),
     (lambda c: c["vllm-fleet:endpoint"].update(
         plainHttp=False, certificateArn="arn:aws:acm:eu-west-1:123456789012:certificate/abc"),
      ("vllm-fleet:endpoint.certificateArn", "eu-west-1", "us-east-1"))],
)
def test_ids_regions_and_arns_are_checked(tmp_path: Path, mutate: Any, needles: tuple[str, ...]) -> None:
    doc = base_stack()
    doc["config"].setdefault("vllm-fleet:network", {})
    mutate(doc["config"])
    plan_refusal(tmp_path, doc, *needles)


@pytest.mark.parametrize(
    ("flag", "value", "needle"),
    [("--max-nodes", "0", "--max-nodes = 0"), ("--max-model-len", "10", "--max-model-len = 10"),
     ("--max-num-seqs", "0", "--max-num-seqs = 0")],
)
def test_size_flags_share_the_stack_keys_ranges(flag: str, value: str, needle: str) -> None:
    args = {"--max-nodes": "4", "--max-model-len": "4096", "--max-num-seqs": "8", flag: value}
    run = size("--model", "llama-3.1-8b", "--quantization", "bf16", *[x for kv in args.items() for x in kv])
    assert_refused(run, needle, "..")


# --- the plan agrees with the deploy --------------------------------------------------------------
@pytest.mark.parametrize("model", ["mistral-7b", "llama-3.1-8b"])
def test_size_never_recommends_more_servers_per_node_than_an_alb_serves(model: str) -> None:
    plan = make_plan(SizingRequest(model, default_catalog().models[model], "fp16", 4096, 1))
    assert plan.layout.replicas_per_node <= 5
    assert any("ALB forwards to at most 5" in c.reason for c in plan.alternatives + [plan.chosen]) or \
        plan.layout.replicas_per_node < 8


def test_max_replicas_hint_names_the_first_count_that_works() -> None:
    config = load_stack_file("prod-70b-awq")
    layout = Layout("p4de.24xlarge", 2, 1, 1, 2)  # 2 replicas per node
    tight = config.model_copy(update={"capacity": config.capacity.model_copy(
        update={"min_replicas": 1, "max_replicas": 2, "market": "on-demand"})})
    with pytest.raises(FleetError, match="set maxReplicas to 3 or more"):
        capacity_layout(tight, layout)
    fits = tight.model_copy(update={"capacity": tight.capacity.model_copy(update={"max_replicas": 3})})
    assert capacity_layout(fits, layout).max_instances == 2


def test_ladder_explains_its_order_and_cost() -> None:
    stack_plan = build_stack_plan(load_stack_file("prod-70b-awq"), validate=False)
    lines = ladder_explanation(stack_plan.plan)
    assert lines[0].startswith("order: cheapest per replica first")
    assert any("× the first" in line for line in lines), lines
    assert any(line.startswith("left out: ") and "per replica" in line for line in lines), lines


# --- region and market --------------------------------------------------------------------------
def test_price_says_its_region_and_market() -> None:
    config = load_stack_file("prod-70b")
    for region, market, needles in [
        ("us-east-1", "on-demand", ("on-demand list price, us-east-1",)),
        ("eu-west-1", "on-demand", ("eu-west-1 is not in the price catalog", "us-east-1 price")),
        ("ap-southeast-2", "spot", ("spot ceiling", "ap-southeast-2 is not in the price catalog")),
    ]:
        changed = config.model_copy(update={"region": region, "capacity": config.capacity.model_copy(
            update={"market": market})})
        plan = make_plan(sizing_request(changed))
        for needle in needles:
            assert needle in plan.chosen.price_basis, (region, market, plan.chosen.price_basis)
        assert (plan.request.region, plan.request.market) == (region, market)


def test_fleet_cost_counts_the_fixed_parts() -> None:
    stack_plan = build_stack_plan(load_stack_file("prod-70b"), validate=False)
    cost = stack_fleet_cost(stack_plan)
    parts = {line.what.split(" ")[0] + " " + line.what.split(" ")[1] for line in cost.lines}
    assert {"NAT gateway", "load balancer", "monitoring host"} <= parts, parts
    node = cost.lines[0]
    per_node = stack_plan.plan.layout.replicas_per_node  # 2..6 replicas, whole nodes
    assert (node.count_min, node.count_max) == (-(-2 // per_node), -(-6 // per_node))
    fixed = cost.min_usd_per_hour - node.min_usd_per_hour
    assert cost.max_usd_per_hour - cost.min_usd_per_hour == pytest.approx(
        (node.count_max - node.count_min) * node.usd_per_hour_each)
    # two NAT gateways (0.045), their IPs and two public LB IPs (0.005 each), an ALB (0.0225), the host
    assert fixed == pytest.approx(2 * 0.045 + 4 * 0.005 + 0.0225 + 0.0336)


# --- safe defaults -------------------------------------------------------------------------------
def test_endpoint_without_certificate_is_refused_with_how_to_get_one(tmp_path: Path) -> None:
    doc = base_stack()
    del doc["config"]["vllm-fleet:endpoint"]["plainHttp"]
    plan_refusal(tmp_path, doc, "vllm-fleet:endpoint.certificateArn", "aws acm request-certificate", "plainHttp")


def test_monitoring_is_on_unless_switched_off(tmp_path: Path) -> None:
    doc = base_stack()
    del doc["config"]["vllm-fleet:monitoring"]
    plan_refusal(tmp_path, doc, "vllm-fleet:monitoring", "mode: none")
    values = base_stack()["config"]
    values["vllm-fleet:monitoring"] = {"mode": "none"}
    assert parse_stack_config("dev-8b", values).monitoring.mode == "none"


def test_consequential_defaults_are_listed() -> None:
    lines = defaults_in_effect(load_stack_file("prod-70b"))
    assert any(line.startswith('vllm-fleet:network.egress = "nat" (default)') for line in lines), lines
    assert not any("endpoint.internal" in line for line in lines), "prod-70b sets internal"


# --- conventional CLI ----------------------------------------------------------------------------
def test_help_version_and_completion() -> None:
    for args in (["-h"], ["size", "-h"], ["plan", "--help"]):
        run = run_cli(*args)
        assert run.code == 0 and run.stdout.startswith("Usage: vllm-fleet"), run.stdout
        assert "<bool>" not in run.stdout and "{stack}" not in run.stdout
    assert "--install-completion" in run_cli("-h").stdout
    version = run_cli("--version")
    assert version.code == 0 and version.stdout.startswith("vllm-fleet ")


def test_warnings_go_to_stderr_and_into_json(tmp_path: Path) -> None:
    run = run_cli("plan", "dev-8b", "--json", "--out", tmp_path / "out")
    assert run.code == 0, run.stderr
    doc = json.loads(run.stdout)  # stdout is the JSON document alone
    assert any("plainHttp" in w for w in doc["warnings"]), doc["warnings"]
    assert "WARNING: vllm-fleet:endpoint.plainHttp" in run.stderr
    assert doc["fleet_cost"]["max_usd_per_month"] > doc["fleet_cost"]["min_usd_per_month"] > 0


def test_piped_tables_are_not_cut() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "infra", "size", "--model", "llama-3.1-70b", "--quantization", "fp16",
         "--max-model-len", "8192"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
        env={**os.environ, "COLUMNS": "80"},
    )
    assert run.returncode == 0, run.stderr
    assert "…" not in run.stdout
    assert "why not chosen" in run.stdout and "on-demand list price, us-east-1" in run.stdout


def test_size_prices_for_the_region_and_market_asked() -> None:
    run = size("--model", "llama-3.1-8b", "--quantization", "bf16", "--max-model-len", "8192",
               "--region", "ap-southeast-2", "--market", "spot", "--json")
    assert run.code == 0, run.stderr
    doc = json.loads(run.stdout)
    assert (doc["region"], doc["market"]) == ("ap-southeast-2", "spot")
    assert "spot ceiling" in doc["price_basis"] and "ap-southeast-2 is not in the price catalog" in doc["price_basis"]
    assert_refused(size("--model", "llama-3.1-8b", "--quantization", "bf16", "--max-model-len", "8192",
                        "--region", "us-east-9"), '--region = "us-east-9"', "did you mean")
    assert_refused(size("--model", "llama-3.1-8b", "--quantization", "bf16", "--max-model-len", "8192",
                        "--market", "reserved"), "--market", "on-demand, spot, capacity-block")


def test_regional_catalog_prices_and_offerings() -> None:
    """Types whose regional rows were read are priced for the region, and refused where not offered."""
    arch = default_catalog().models["llama-3.1-70b"]
    west = make_plan(SizingRequest("llama-3.1-70b", arch, "fp16", 8192, 8, ("p4d",), region="eu-west-1"))
    assert west.chosen.hourly_usd_per_replica == pytest.approx(23.71569 / west.layout.replicas_per_node)
    assert "on-demand list price, eu-west-1 (regional catalog read" in west.chosen.price_basis
    spot = make_plan(SizingRequest("llama-3.1-70b", arch, "fp16", 8192, 8, ("p4d",), region="eu-west-1",
                                   market="spot"))
    assert spot.chosen.hourly_usd_per_replica == west.chosen.hourly_usd_per_replica  # the ceiling
    assert "lowest AZ spot price seen 9.7598" in spot.chosen.price_basis
    with pytest.raises(FleetError, match="p5.48xlarge is not offered in eu-west-1"):
        make_plan(SizingRequest("llama-3.1-70b", arch, "fp16", 8192, 8, ("p5.48xlarge",), region="eu-west-1"))


def test_fp8_checkpoint_gets_no_online_quantization_flag(tmp_path: Path) -> None:
    values = base_stack()["config"]
    fp8 = {**LLAMA_8B_CONFIG, "quantization_config": {"quant_method": "fp8", "activation_scheme": "dynamic"}}
    values["vllm-fleet:model"] = {"repo": "acme/llama-8b-fp8", "revision": "main", "architecture": fp8}
    values["vllm-fleet:serving"]["quantization"] = "fp8"
    stack_plan = build_stack_plan(parse_stack_config("dev-8b", values), validate=False)
    assert "--quantization" not in stack_plan.serve_argv  # vLLM reads fp8 from config.json
    values["vllm-fleet:model"] = {"catalog": "llama-3.1-8b", "repo": "meta-llama/Llama-3.1-8B-Instruct"}
    online = build_stack_plan(parse_stack_config("dev-8b", values), validate=False)
    assert online.serve_argv[online.serve_argv.index("--quantization") + 1] == "fp8_per_tensor"


@pytest.mark.parametrize("stack", ["dev-8b", "images"])
def test_plan_again_into_its_own_directory(tmp_path: Path, stack: str) -> None:
    out = tmp_path / "out"
    for _ in range(2):
        run = run_cli("plan", stack, "--out", out, "--json")
        assert run.code == 0, run.stderr
