"""Day-2 changes under the mocks: change each stack input a platform engineer routinely
changes, run the program before and after, and list what `pulumi up` would replace, from the
provider's replace-on-change properties (infra/facts/data/provider_replacements.yaml,
infra/preview/replacement.py). None may replace the groups, the API key's secret or the load balancer
unless the change truly requires it: a gang runs one launch-template version on all its nodes,
so a new version is a new gang (created before the old one goes).

The table of results is docs/day2.md (between the markers); regenerate it deliberately with
`pytest --snapshot-update` and review the diff.
"""

from __future__ import annotations

import inspect
import json
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import pulumi_aws as aws
import pulumi_random as random
import pytest

from infra.config import StackConfig, load_stack_file
from infra.plan.build import build_stack_plan
from infra.preview import offline
from infra.preview.offline import ResourceRecord
from infra.preview.replacement import Day2Diff, day2_diff, replacement_table
from infra.program.stack import deploy

DOC = Path(__file__).resolve().parent.parent / "docs" / "day2.md"
BEGIN, END = "<!-- day2-table:begin -->", "<!-- day2-table:end -->"
DAY2_STACKS = ("dev-8b", "prod-70b", "prod-405b")
OLD_AMI, NEW_AMI = "ami-0aaaaaaaaaaaaaaaa", "ami-0bbbbbbbbbbbbbbbb"
NEW_PIN_PARAMETER = "/vllm-fleet/images/vllm-0-33-0/ami-id"

GROUP = "aws:autoscaling/group:Group"
LAUNCH_TEMPLATE = "aws:ec2/launchTemplate:LaunchTemplate"
# What no routine change may replace or delete: the key and its value, the front door.
KEEP = {
    "aws:secretsmanager/secret:Secret",
    "aws:secretsmanager/secretVersion:SecretVersion",
    "random:index/randomPassword:RandomPassword",
    "aws:lb/loadBalancer:LoadBalancer",
    "aws:lb/listener:Listener",
    "aws:lb/targetGroup:TargetGroup",
}


def section(config: StackConfig, name: str, **changes: Any) -> StackConfig:
    return config.model_copy(update={name: getattr(config, name).model_copy(update=changes)})


def shorter_ladder(config: StackConfig) -> StackConfig:
    """Drop the plan's last fallback type (or, with one rung, the last listed type the plan
    does not run: a gang's ladder is its one type, and dropping that type is a re-plan)."""
    plan = build_stack_plan(config, validate=False).plan
    rungs = [c.layout.instance_type for c in plan.fallbacks]
    types = config.capacity.instance_types
    if len(rungs) < 2:
        chosen = plan.layout.instance_type
        unused = [t for t in types if t != chosen and not chosen.startswith(f"{t}.")]
        return section(config, "capacity", instance_types=[t for t in types if t != unused[-1]] if unused else types[:-1])
    last = rungs[-1]
    return section(config, "capacity", instance_types=[t for t in types if t != last and not last.startswith(f"{t}.")])


@dataclass(frozen=True)
class Change:
    key: str  # what the engineer edits
    edit: Callable[[StackConfig], StackConfig]
    ssm_after: str = OLD_AMI  # the fleet image parameter's value after the change


CHANGES = (
    Change("serving.shutdownTimeoutS", lambda c: section(c, "serving", shutdown_timeout_s=c.serving.shutdown_timeout_s + 60)),
    Change("serving.concurrency", lambda c: section(c, "serving", concurrency=c.serving.concurrency * 2)),
    Change("capacity.instanceTypes", shorter_ladder),
    Change("image (a new AMI)", lambda c: section(c, "image", ami_id=NEW_AMI) if c.image.ami_id else c, ssm_after=NEW_AMI),
    Change("image (the vLLM pin: a new bake)", lambda c: section(c, "image", ami_id=None, ssm_parameter=NEW_PIN_PARAMETER)),
    Change("monitoring.mode", lambda c: section(c, "monitoring", mode="none")),
    Change("endpoint.allowedCidrs", lambda c: section(c, "endpoint", allowed_cidrs=[*c.endpoint.allowed_cidrs, "192.168.0.0/16"])),
)


def run(config: StackConfig, fleet_ami: str) -> list[ResourceRecord]:
    plan = build_stack_plan(config, validate=False)
    parameter = config.image.ssm_parameter or "/none"
    mocks = offline.OfflineMocks(
        region=config.region,
        preview=False,  # ids and ARNs known: a replacement cascades through them
        capacity_block_instance_type=plan.plan.layout.instance_type,
        ssm_parameters={parameter: fleet_ami, NEW_PIN_PARAMETER: NEW_AMI},
    )
    result = offline.run_offline(lambda: deploy(plan), project="vllm-fleet", stack=config.stack, mocks=mocks, preview=False)
    return result.records


@cache
def diff(stack: str, key: str) -> tuple[Day2Diff, StackConfig]:
    change = next(c for c in CHANGES if c.key == key)
    config = load_stack_file(stack)
    return day2_diff(run(config, OLD_AMI), run(change.edit(config), change.ssm_after)), config


def servers_per_node(config: StackConfig) -> int:
    return build_stack_plan(config, validate=False).plan.layout.replicas_per_node


CASES = [(s, c.key) for s in DAY2_STACKS for c in CHANGES]


@pytest.mark.parametrize(("stack", "key"), CASES)
def test_routine_change_replaces_only_what_it_must(stack: str, key: str) -> None:
    found, config = diff(stack, key)
    for resource in found.replaced:
        assert resource.type not in KEEP, resource.line()
    # Turning monitoring off deletes its own secret; the API key and the front door stay,
    # but for the target groups of vLLM server slots a new plan no longer runs on a node.
    change = next(c for c in CHANGES if c.key == key)
    slots = servers_per_node(change.edit(config))
    gone_slots = {f"endpoint-tg-{i}" for i in range(slots, servers_per_node(config))}
    kept = [k for k in found.deleted if k[0] in KEEP and k[1].startswith(("api-key-", "endpoint-"))]
    assert {name for _, name in kept} <= gone_slots, kept
    new_template = any(t == LAUNCH_TEMPLATE for t, _ in found.updated)
    for resource in found.replaced:
        if resource.type == GROUP:
            # Only a gang, and only for a new launch-template version of its type.
            assert resource.name.startswith("fleet-gang-") and new_template, resource.line()
    # Protected resources (the API key's secret, the nodes' logs, the monitoring host and its
    # metrics history) are never replaced; only turning self-hosted monitoring off deletes one,
    # and Pulumi refuses that until it is unprotected deliberately.
    assert set(found.blocked) <= ({"monitoring-host"} if key == "monitoring.mode" else set()), found.blocked
    if new_template and config.capacity.max_nodes_per_replica and not found.replaced:
        assert "fleet-fleet" in found.refreshed, "a new template version must roll the fleet group"
    assert "fleet-fleet" not in found.replaced_names()


def test_shutdown_timeout_no_longer_replaces_the_group() -> None:
    """The defect: the drain hook's timeout (from shutdownTimeoutS) sat in the group's ForceNew
    initial_lifecycle_hooks. Its record, with the hook put back, is replaced on that change."""
    found, _ = diff("dev-8b", "serving.shutdownTimeoutS")
    assert ("aws:autoscaling/lifecycleHook:LifecycleHook", "fleet-fleet-drain") in found.updated
    config = load_stack_file("dev-8b")
    before, after = run(config, OLD_AMI), run(CHANGES[0].edit(config), OLD_AMI)

    def with_initial_drain(records: list[ResourceRecord]) -> list[ResourceRecord]:
        hooks = {r.name: r.engine_inputs for r in records if r.type.endswith("lifecycleHook:LifecycleHook")}
        out = []
        for r in records:
            if r.type == GROUP:
                hook = {k: v for k, v in hooks[f"{r.name}-drain"].items() if k != "autoscalingGroupName"}
                r = ResourceRecord(**{**r.__dict__, "engine_inputs": {**r.engine_inputs, "initialLifecycleHooks": [hook]}})
            out.append(r)
        return out

    old_code = day2_diff(with_initial_drain(before), with_initial_drain(after))
    assert "fleet-fleet" in old_code.replaced_names()
    (group,) = [r for r in old_code.replaced if r.name == "fleet-fleet"]
    assert group.because == ("initialLifecycleHooks",)


def test_the_table_covers_every_type_and_names_real_inputs() -> None:
    """Every type the program declares has an entry, and each ForceNew property is an input of
    the pulumi-aws (or pulumi-random) class of that type (the table cannot name a typo)."""
    table = replacement_table().types
    declared = {r.type for s in DAY2_STACKS for r in run(load_stack_file(s), OLD_AMI) if r.custom}
    assert declared <= set(table), sorted(declared - set(table))
    for type_token, entry in table.items():
        package, module, kind = type_token.split(":")[0], type_token.split(":")[1].split("/")[0], type_token.split(":")[2]
        cls = getattr(getattr(aws, module), kind) if package == "aws" else getattr(random, kind)
        params = set(inspect.signature(cls._internal_init).parameters)
        for prop in entry.force_new:
            snake = re.sub(r"(?<!^)(?=[A-Z])", "_", prop.split(".")[0]).lower()
            assert snake in params, f"{type_token}: {prop} is not an input of {cls.__name__}"
        assert entry.source


def day2_table() -> str:
    lines = [
        "| change | stack | must be replaced | rolls (instance refresh) | updated in place | created | deleted | refused (protected) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key in [c.key for c in CHANGES]:
        for stack in DAY2_STACKS:
            found, _ = diff(stack, key)
            replaced = ", ".join(f"{r.name} ({'; '.join(r.because)})" for r in found.replaced) or "none"
            lines.append(
                f"| {key} | {stack} | {replaced} | {', '.join(found.refreshed) or '-'} | "
                f"{len(found.updated)} | {len(found.created)} | {len(found.deleted)} | {', '.join(found.blocked) or '-'} |"
            )
    return "\n".join(lines)


def test_day2_table_in_docs_is_current(pytestconfig: pytest.Config) -> None:
    text = DOC.read_text(encoding="utf-8")
    assert BEGIN in text and END in text, f"{DOC} lacks the table markers"
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    current = f"{head}{BEGIN}\n{day2_table()}\n{END}{tail}"
    if pytestconfig.getoption("--snapshot-update"):
        DOC.write_text(current, encoding="utf-8")
    assert text == current, "docs/day2.md: the day-2 table changed; review, then --snapshot-update"


def test_plan_says_loudly_what_must_be_replaced(tmp_path: Path) -> None:
    """`vllm-fleet plan STACK --since DIR` (DIR: the deployed version's stacks directory) lists
    each replacement the way Terraform does, "must be replaced", with what forces it."""
    root = Path(__file__).resolve().parent.parent
    deployed, edited = tmp_path / "deployed", tmp_path / "edited"
    deployed.mkdir()
    edited.mkdir()
    source = (root / "stacks" / "Pulumi.prod-405b.yaml").read_text(encoding="utf-8")
    (deployed / "Pulumi.prod-405b.yaml").write_text(source, encoding="utf-8")
    assert "shutdownTimeoutS: 300" in source
    (edited / "Pulumi.prod-405b.yaml").write_text(source.replace("shutdownTimeoutS: 300", "shutdownTimeoutS: 360"))
    base = [sys.executable, "-m", "infra", "plan", "prod-405b", "--stacks-dir", str(edited), "--since", str(deployed)]
    run = subprocess.run([*base, "--out", str(tmp_path / "out"), "--json"], cwd=root, capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr
    lines = json.loads(run.stdout)["replacements"]
    assert any(line.startswith("aws:autoscaling/group:Group fleet-gang-0 must be replaced (launchTemplate") for line in lines)
    assert not any("api-key" in line or "endpoint-lb" in line for line in lines)
    human = subprocess.run([*base, "--out", str(tmp_path / "out2")], cwd=root, capture_output=True, text=True, timeout=300, check=False)
    assert human.returncode == 0, human.stderr
    assert "resource(s) must be replaced" in human.stdout and "fleet-gang-1 must be replaced" in human.stdout


def test_a_new_password_in_pulumi_never_becomes_the_current_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """The defect: secret_string is ForceNew, and a new version becomes AWSCURRENT, so any
    change that replaced the password (its length, say) wrote Pulumi's key over the one
    `rotate-key` made current. The version now ignores its value: nothing is replaced."""
    from infra.components import api_key

    def key_records() -> list[ResourceRecord]:
        mocks = offline.OfflineMocks(region="us-east-1", preview=False)
        program = lambda: api_key.ApiKey("api-key", api_key.ApiKeyArgs(secret_name="vllm-fleet/t/api-key", tags={}))
        return offline.run_offline(program, project="vllm-fleet", stack="t", mocks=mocks, preview=False).records

    before = key_records()
    monkeypatch.setattr(api_key, "KEY_LENGTH", api_key.KEY_LENGTH + 16)
    after = key_records()
    found = day2_diff(before, after)
    assert found.replaced_names() == {"api-key-value"}
    assert ("aws:secretsmanager/secretVersion:SecretVersion", "api-key-version") not in found.updated
    # The same records without the ignoreChanges option: the version is replaced (the old code).
    unguarded = [ResourceRecord(**{**r.__dict__, "options": {**r.options, "ignoreChanges": []}}) for r in before + after]
    old_code = day2_diff(unguarded[: len(before)], unguarded[len(before) :])
    assert "api-key-version" in old_code.replaced_names()
