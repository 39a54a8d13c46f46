"""``vllm-fleet``: size a model, plan a stack offline, and operate a fleet.

Human output is tables; ``--json`` is for machines. Bad input is one line on stderr and
exit status 2, never a traceback.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any, get_args

import typer
from rich.console import Console
from rich.table import Table

from infra.catalog import default_catalog
from infra.config import (
    PROJECT,
    STACKS_DIR,
    CapacitySection,
    ImagesStackConfig,
    Market,
    ServingSection,
    arch_from_config_doc,
    check_region,
    check_serving_fits_model,
    int_range,
    load_any_stack_file,
    load_config_json,
    path_kind,
)
from infra.errors import FleetError
from infra.ops.commands import register as register_ops_commands
from infra.planner import (
    GB,
    Candidate,
    GiB,
    Plan,
    SizingRequest,
    ladder_explanation,
    make_plan,
    serving_facts,
)
from infra.stackplan import StackPlan, build_stack_plan, write_artifacts

app = typer.Typer(
    name=PROJECT,
    help="Production vLLM fleets on AWS: sizing, offline plans and operations.",
    no_args_is_help=True,
    # --install-completion / --show-completion for bash, zsh, fish and PowerShell.
    add_completion=True,
    pretty_exceptions_enable=False,
    # Plain click help: conventional metavars (TEXT, INTEGER), none on flags.
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
# Not a terminal (a pipe, CI logs): wide enough that table headers are never cut; columns
# fold their text instead of truncating it (see _table).
out = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 160)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            installed = version(PROJECT)
        except PackageNotFoundError:
            installed = "unknown (not installed as a package)"
        print(f"{PROJECT} {installed}")
        raise typer.Exit()


@app.callback()
def _root(
    show_version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="print the version and exit")
    ] = False,
) -> None:
    """Production vLLM fleets on AWS: sizing, offline plans and operations."""


def _warn(message: str) -> None:
    """Warnings go to stderr (stdout stays the result); --json output carries them too."""
    err.print(f"[bold yellow]WARNING: {message}[/bold yellow]", soft_wrap=True)


def _print_json(doc: Any) -> None:
    sys.stdout.write(json.dumps(doc, indent=2, sort_keys=False) + "\n")


def _model_request(model: str) -> tuple[str, Any, bool]:
    """(name, architecture, described by a config.json) for ``--model``."""
    catalog = default_catalog()
    if model in catalog.models:
        return model, catalog.models[model], False
    path = Path(model)
    kind = path_kind(path, "--model")
    if path.suffix == ".json" or kind != "missing":
        doc = load_config_json(path, key="--model")
        arch = arch_from_config_doc(doc, source=str(path), repo=None, key="--model")
        # The name is the checkpoint's repo id when config.json records it (org/name), else its directory.
        folder = (path if kind == "dir" else path.parent).resolve().name
        name = arch.hf_repo if "/" in arch.hf_repo and not arch.hf_repo.startswith((".", "/")) else folder
        return name or model, arch, True
    raise FleetError(
        f"--model = {model!r}: not a catalog model or a config.json path "
        f"(catalog: {', '.join(sorted(catalog.models))})"
    )


def _in_range(flag: str, value: int, bounds: tuple[int, int], what: str) -> int:
    low, high = bounds
    if not low <= value <= high:
        raise FleetError(f"{flag} = {value}: {what} must be {low}..{high} (the stack key's range)")
    return value


@app.command()
def size(
    model: Annotated[
        str, typer.Option(help="catalog name (e.g. llama-3.1-70b), or a config.json or its directory", metavar="MODEL")
    ],
    max_model_len: Annotated[int, typer.Option(help="context length in tokens", metavar="TOKENS")],
    quantization: Annotated[
        str | None,
        typer.Option(
            help="fp16, bf16, fp8, int8, awq or gptq; default: what config.json's quantization_config says",
            metavar="NAME",
        ),
    ] = None,
    max_num_seqs: Annotated[
        int | None, typer.Option(help="sequences per replica at full context (default from data)", metavar="N")
    ] = None,
    instance_types: Annotated[
        str | None, typer.Option(help="comma-separated instance types or families", metavar="TYPES")
    ] = None,
    max_nodes: Annotated[int, typer.Option(help="most nodes one replica may span", metavar="N")] = 4,
    region: Annotated[str, typer.Option(help="AWS Region the prices are for", metavar="REGION")] = "us-east-1",
    market: Annotated[str, typer.Option(help="on-demand, spot or capacity-block", metavar="MARKET")] = "on-demand",
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Pick the instance type, GPUs and vLLM parallelism for one model."""
    catalog = default_catalog()
    check_region(region, "--region")
    markets = get_args(Market)
    if market not in markets:
        raise FleetError(f"--market = {market!r}: allowed: {', '.join(markets)}")
    _in_range("--max-model-len", max_model_len, int_range(ServingSection, "max_model_len"), "tokens")
    _in_range("--max-nodes", max_nodes, int_range(CapacitySection, "max_nodes_per_replica"), "nodes")
    seqs = max_num_seqs if max_num_seqs is not None else serving_facts().defaults.concurrency
    _in_range("--max-num-seqs", seqs, int_range(ServingSection, "concurrency"), "sequences")
    types = tuple(t.strip() for t in instance_types.split(",") if t.strip()) if instance_types else ()
    known = set(catalog.instances) | {it.family for it in catalog.instances.values()}
    for t in types:
        if t not in known:
            raise FleetError(f"--instance-types: {t!r} is not a known instance type or family")
    if instance_types is not None and not types:
        raise FleetError("--instance-types = '': empty; give instance types or families, or leave the flag out")
    name, arch, from_config_json = _model_request(model)
    quantization = quantization if quantization is not None else arch.checkpoint_quantization
    if quantization is None:
        raise FleetError("--quantization: required for this model (its config.json declares no quantization_config)")
    if quantization not in catalog.quantizations:
        raise FleetError(
            f"--quantization = {quantization!r}: not known (allowed: {', '.join(catalog.quantizations)})"
        )
    check_serving_fits_model(
        arch, quantization, max_model_len, quant_key="--quantization", len_key="--max-model-len",
        from_config_json=from_config_json,
    )
    plan = make_plan(
        SizingRequest(name, arch, quantization, max_model_len, seqs, types, max_nodes, region=region, market=market)
    )
    if as_json:
        _print_json({**plan.summary(), **_price_json(plan), "alternatives": _alternatives_json(plan)})
    else:
        _print_plan(plan)


@app.command()
def plan(
    stack: Annotated[str, typer.Argument(help="stack name: reads stacks/Pulumi.<stack>.yaml", metavar="STACK")],
    out_dir: Annotated[
        Path | None, typer.Option("--out", help="artifact directory [default: build/STACK]", metavar="DIR")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
    stacks_dir: Annotated[
        Path, typer.Option(help="where Pulumi.<stack>.yaml files live", metavar="DIR", show_default="stacks/")
    ] = STACKS_DIR,
) -> None:
    """Plan a stack offline: the sizing decision, its runner-ups, and rendered artifacts."""
    config = load_any_stack_file(stack, stacks_dir)
    check_output_dir(out_dir or Path("build") / stack, "--out")
    if isinstance(config, ImagesStackConfig):
        from infra.images_plan import run_plan

        run_plan(config, out_dir, as_json)
        return
    stack_plan = build_stack_plan(config)
    # Pulumi only now: the program runs under in-process mocks, the offline preview.
    from infra.components.fleet import ladder_types
    from infra.offline import preview_resources, resource_tree_text, resources_json
    from infra.policies import check_resources, policy_config
    from infra.scaling import describe_scaling

    records = preview_resources(stack_plan, preview=True)
    pack_config = policy_config(ladder_types(stack_plan))
    violations = check_resources(
        [(r.type, r.name, r.engine_inputs, r.options.get("additionalSecretOutputs", [])) for r in records if r.custom],
        pack_config,
    )
    if violations:
        first = violations[0]
        raise FleetError(
            f"policy {first.policy} fails on {first.resource_type} {first.name}: {first.message}"
            + (f" (and {len(violations) - 1} more)" if len(violations) > 1 else "")
        )
    stack_plan.artifacts["resources.json"] = resources_json(records)
    stack_plan.artifacts["policy-config.json"] = json.dumps(pack_config, indent=2) + "\n"
    target = out_dir or Path("build") / stack
    written = write_artifacts(stack_plan, target)
    from infra.stack_report import defaults_in_effect, stack_fleet_cost

    cost = stack_fleet_cost(stack_plan)
    defaults = defaults_in_effect(config)
    warnings = _plan_warnings(stack_plan)
    for warning in warnings:
        _warn(warning)
    if as_json:
        _print_json(
            {
                "stack": stack,
                **stack_plan.plan.summary(),
                **_price_json(stack_plan.plan),
                "serve_argv": stack_plan.serve_argv,
                "argv_validation": stack_plan.argv_validation,
                "alternatives": _alternatives_json(stack_plan.plan),
                "scaling": describe_scaling(stack_plan),
                "resources": len(records),
                "policy_violations": 0,
                "artifacts": [str(p) for p in written],
                "fleet_cost": cost.as_json(),
                "defaults_in_effect": defaults,
                "fallback_ladder": ladder_explanation(stack_plan.plan),
                "warnings": warnings,
            }
        )
        return
    out.print(f"[bold]Stack {stack}[/bold]: {config.model.catalog or config.model.repo} in {config.region}")
    _print_plan(stack_plan.plan)
    _print_stack_extras(stack_plan)
    _print_fleet_cost(cost)
    out.print("\n[bold]Defaults in effect[/bold] (not set in the stack file; they cost money or expose something):")
    for line in defaults or ["none: the stack file sets every such key"]:
        out.print(f"  {line}", soft_wrap=True)
    out.print(f"\n[bold]Resources[/bold] ({len(records)}; what `pulumi up` would create, from the mocked run):")
    out.file.flush()
    # Plain print: the tree's lines must not be wrapped at the terminal width.
    print(resource_tree_text(records), flush=True)
    out.print(f"Policy pack: {len(records)} resources checked, no violations.")
    out.print(f"\nArtifacts written to {target}/:")
    for path in written:
        out.print(f"  {path.relative_to(target)}")


# Files every earlier plan leaves in its directory (a fleet plan, an image plan).
PLAN_MARKERS = ("plan.json", "image-plan.json")


def check_output_dir(target: Path, flag: str) -> None:
    """Refuse an artifact directory that cannot be written, before anything is created."""
    shown = json.dumps(str(target))
    kind = path_kind(target, flag)
    if kind not in ("dir", "missing"):
        raise FleetError(f"{flag} = {shown}: exists and is not a directory (give a new or empty directory)")
    # Artifacts land next to whatever a directory holds: only an empty one, or an earlier
    # plan's (it has plan.json), so `--out ~` or `--out /` never scatters files.
    earlier_plan = any(path_kind(target / marker, flag) == "file" for marker in PLAN_MARKERS)
    if kind == "dir" and not earlier_plan and any(target.iterdir()):
        raise FleetError(
            f"{flag} = {shown}: a directory that holds other files and no earlier plan "
            "(give a new or empty directory, or an earlier plan's)"
        )
    ancestor = target
    while path_kind(ancestor, flag) == "missing" and ancestor.parent != ancestor:
        ancestor = ancestor.parent
    if path_kind(ancestor, flag) != "dir":
        raise FleetError(f"{flag} = {shown}: {ancestor} is a file, so no directory can be made under it")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise FleetError(f"{flag} = {shown}: {ancestor} is not writable by this user")


def _price_json(plan: Plan) -> dict[str, str]:
    """What the hourly price is (kept out of Plan.summary(), whose hash is the deployed plan id)."""
    return {"region": plan.request.region, "market": plan.request.market, "price_basis": plan.chosen.price_basis}


def _alternatives_json(plan: Plan) -> list[dict[str, Any]]:
    return [
        {
            "instance_type": c.layout.instance_type,
            "tensor_parallel_size": c.layout.tensor_parallel_size,
            "pipeline_parallel_size": c.layout.pipeline_parallel_size,
            "nodes_per_replica": c.layout.nodes_per_replica,
            "replicas_per_node": c.layout.replicas_per_node,
            "feasible": c.feasible,
            "hourly_usd": round(c.hourly_usd_per_replica, 4) if c.hourly_usd_per_replica else None,
            "why_not_chosen": _why_lost(plan, c),
        }
        for c in plan.alternatives
    ]


def _why_lost(plan: Plan, cand: Candidate) -> str:
    if not cand.feasible:
        return cand.reason
    chosen_cost = plan.chosen.hourly_usd_per_replica or 0.0
    cost = cand.hourly_usd_per_replica or 0.0
    if cost > chosen_cost:
        return f"${cost - chosen_cost:,.2f}/h more per replica"
    return "same cost, more GPUs or nodes"


def _layout_text(c: Candidate) -> str:
    lay = c.layout
    text = f"TP {lay.tensor_parallel_size} × PP {lay.pipeline_parallel_size}"
    if lay.nodes_per_replica > 1:
        text += f", {lay.nodes_per_replica} nodes"
    if lay.replicas_per_node > 1:
        text += f", {lay.replicas_per_node} replicas/node"
    return text


def _print_plan(plan: Plan) -> None:
    s = plan.summary()
    req = plan.request
    chosen = plan.chosen
    mem = chosen.memory
    assert mem is not None
    decision = Table(title="Decision", show_header=False, title_justify="left")
    decision.add_column("", style="bold")
    decision.add_column("")
    decision.add_row("model", f"{req.model_name} ({req.arch.params / 1e9:.1f}B params), {req.quantization}")
    decision.add_row("instance", f"{s['instance_type']} ({s['gpu']})")
    decision.add_row("replica", _layout_text(chosen) + f" = {s['gpus_per_replica']} GPU(s)")
    decision.add_row("vLLM", f"--max-model-len {req.max_model_len} --max-num-seqs {req.concurrency} "
                     f"--gpu-memory-utilization {s['gpu_memory_utilization']}")
    decision.add_row("weights", f"{plan.weights_bytes / GB:,.1f} GB total, {mem.weights / GiB:,.2f} GiB per GPU")
    decision.add_row("KV cache", f"{plan.kv_cache_bytes_per_token:,} B/token (model); "
                     f"{chosen.kv_cache_tokens:,} tokens per replica = "
                     f"{plan.concurrent_full_context_seqs} sequences at {req.max_model_len:,}")
    decision.add_row("cost", f"${s['hourly_usd']:,.2f}/h per replica ({chosen.price_basis})")
    decision.add_row("time to ready", f"{s['time_to_ready_s']} s from {s['weights_source']} "
                     f"(timeouts use {s['startup_timeout_s']} s)")
    decision.add_row("fallback ladder", "\n".join(ladder_explanation(plan)))
    out.print(_folded(decision))

    budget = Table(title="Per-GPU memory budget (GiB)", title_justify="left")
    for col in ("GPU", "usable", "weights", "activation", "CUDA graphs", "non-torch", "NCCL", "KV cache"):
        budget.add_column(col, justify="right")
    budget.add_row(*(f"{v / GiB:,.2f}" for v in (
        mem.gpu_total, mem.usable, mem.weights, mem.activation, mem.cuda_graphs, mem.non_torch,
        mem.nccl, mem.kv_cache)))
    out.print(_folded(budget))

    alts = Table(title="Runner-ups (best layout per instance type) and rejects", title_justify="left")
    for col in ("instance", "layout", "$/h/replica", "why not chosen"):
        alts.add_column(col)
    for c in plan.alternatives:
        if c.feasible:
            cost = f"{c.hourly_usd_per_replica:,.2f}" if c.hourly_usd_per_replica is not None else "-"
            alts.add_row(c.layout.instance_type, _layout_text(c), cost, _why_lost(plan, c))
    rejected_types = sorted({c.layout.instance_type for c in plan.alternatives if not c.feasible})
    for name in rejected_types:
        best = _closest_reject(plan, name)
        alts.add_row(name, _layout_text(best), "-", best.reason)
    out.print(_folded(alts))

    ttr = Table(title="Modeled time to ready by weight source", title_justify="left")
    ttr.add_column("source")
    ttr.add_column("seconds", justify="right")
    for source, seconds in sorted(plan.time_to_ready_by_source.items(), key=lambda kv: kv[1]):
        ttr.add_row(source, f"{seconds:,.0f}")
    out.print(_folded(ttr))


def _folded(table: Table) -> Table:
    """Cells wrap onto more lines instead of being cut with an ellipsis."""
    for column in table.columns:
        column.overflow = "fold"
        column.no_wrap = False
    return table


def _closest_reject(plan: Plan, instance_type: str) -> Candidate:
    """The reject worth showing for a type: the biggest single-node layout that was sized
    (its memory reason is the informative one), else the first rule it broke."""
    rejects = [c for c in plan.alternatives if c.layout.instance_type == instance_type]
    return max(rejects, key=lambda c: (
        c.memory is not None, c.layout.nodes_per_replica == 1, c.layout.gpus_per_replica,
        -c.layout.pipeline_parallel_size,
    ))


def _print_stack_extras(stack_plan: StackPlan) -> None:
    out.print("\n[bold]vllm serve[/bold] " + " ".join(stack_plan.serve_argv[2:]))
    from infra.scaling import describe_scaling

    out.print("\n[bold]Scaling[/bold]")
    out.file.flush()
    for line in describe_scaling(stack_plan):
        print(f"  {line}", flush=True)
    if stack_plan.argv_validation == "validated":
        out.print("argv: accepted by vLLM's own parser (pinned version)")


def _plan_warnings(stack_plan: StackPlan) -> list[str]:
    """Allowed but risky: printed on stderr, and carried in --json."""
    found = list(stack_plan.warnings)
    if stack_plan.argv_validation != "validated":
        found.append(stack_plan.argv_validation)
    endpoint = stack_plan.config.endpoint
    if endpoint.plain_http:
        found.append(
            f"{PROJECT}:endpoint.plainHttp = true: the API key crosses the VPC in clear text on port 80; "
            "give certificateArn for TLS"
        )
    if stack_plan.config.monitoring.mode == "none":
        found.append(f"{PROJECT}:monitoring.mode = \"none\": no metrics, dashboards or alerts for this fleet")
    return found


def _print_fleet_cost(cost: Any) -> None:
    hours = cost.hours_per_month
    table = Table(title="Fleet cost (USD)", title_justify="left")
    for col in ("part", "count (min..max)", "$/h each", "note"):
        table.add_column(col)
    for line in cost.lines:
        table.add_row(line.what, f"{line.count_min}..{line.count_max}", f"{line.usd_per_hour_each:,.4f}", line.note)
    out.print(_folded(table))
    out.print(
        f"total: ${cost.min_usd_per_hour:,.2f}/h at minReplicas .. ${cost.max_usd_per_hour:,.2f}/h at maxReplicas "
        f"(${cost.min_usd_per_hour * hours:,.0f} .. ${cost.max_usd_per_hour * hours:,.0f} per {hours:g}-hour month); "
        f"{cost.excluded}",
        soft_wrap=True,
    )


register_ops_commands(app)


def main() -> None:
    try:
        app(prog_name=PROJECT, standalone_mode=False)
    except FleetError as err:
        print(f"{PROJECT}: error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    except typer.Abort:
        print(f"{PROJECT}: aborted", file=sys.stderr)
        sys.exit(130)
    except typer.exceptions.TyperException as err:
        # Usage errors (unknown option, a value of the wrong type): one line, like ours.
        param = getattr(err, "param_hint", None) or getattr(getattr(err, "param", None), "opts", None)
        hint = f"{param if isinstance(param, str) else '/'.join(param)}: " if param else ""
        message = err.format_message() if hasattr(err, "format_message") else str(err)
        print(f"{PROJECT}: error: {hint}{message}".replace("\n", " "), file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
