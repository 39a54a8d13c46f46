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
    load_stack_file,
    path_kind,
)
from infra.errors import FleetError
from infra.facts.catalog import default_catalog
from infra.facts.perf import default_workload
from infra.facts.workload import Workload
from infra.ops.commands import register as register_ops_commands
from infra.plan.build import build_stack_plan
from infra.plan.planner import (
    GB,
    Candidate,
    GiB,
    Plan,
    SizingRequest,
    ladder_explanation,
    make_plan,
    performance_json,
    serving_facts,
)
from infra.plan.stack import StackPlan
from infra.render.stack import render_artifacts, write_artifacts

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
    input_tokens: Annotated[int | None, typer.Option(help="typical prompt tokens (default from data)")] = None,
    output_tokens: Annotated[int | None, typer.Option(help="typical output tokens (default from data)")] = None,
    ttft_p95_ms: Annotated[float | None, typer.Option(help="time-to-first-token p95 target, ms")] = None,
    itl_p95_ms: Annotated[float | None, typer.Option(help="inter-token latency p95 target, ms")] = None,
    peak_rps: Annotated[float | None, typer.Option(help="peak requests/s, for the replica count")] = None,
    concurrent_users: Annotated[int | None, typer.Option(help="requests in flight at peak (instead of --peak-rps)")] = None,
    tensor_parallel_size: Annotated[
        int | None, typer.Option(help="consider only layouts with this TP (e.g. 1 for one GPU per replica)")
    ] = None,
    memory_only: Annotated[bool, typer.Option(help="size by memory alone, without the performance model")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Pick the instance type, GPUs, vLLM parallelism and batch flags for one model and workload."""
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
    workload = workload_from_options(
        {"--input-tokens": input_tokens, "--output-tokens": output_tokens, "--ttft-p95-ms": ttft_p95_ms,
         "--itl-p95-ms": itl_p95_ms, "--peak-rps": peak_rps, "--concurrent-users": concurrent_users},
        max_model_len,
    )
    if tensor_parallel_size is not None and tensor_parallel_size not in (1, 2, 4, 8, 16):
        raise FleetError(f"--tensor-parallel-size = {tensor_parallel_size}: must be 1, 2, 4, 8 or 16")
    plan = make_plan(SizingRequest(
        name, arch, quantization, max_model_len, seqs, types, max_nodes, workload=workload,
        performance_model=not memory_only, tensor_parallel_size=tensor_parallel_size,
        region=region, market=market,
    ))
    if as_json:
        _print_json({**plan.summary().as_json(), **_price_json(plan), "alternatives": _alternatives_json(plan)})
    else:
        given = input_tokens or output_tokens or ttft_p95_ms or itl_p95_ms
        _print_plan(plan, "" if given else " (defaults: no --input-tokens/--output-tokens/--ttft-p95-ms/--itl-p95-ms)")


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
    since: Annotated[
        Path | None,
        typer.Option(help="stacks directory of the deployed version: list what the change would replace",
                     metavar="DIR"),
    ] = None,
) -> None:
    """Plan a stack offline: the sizing decision, its runner-ups, and rendered artifacts."""
    config = load_any_stack_file(stack, stacks_dir)
    check_output_dir(out_dir or Path("build") / stack, "--out")
    if isinstance(config, ImagesStackConfig):
        from infra.cli.images import run_plan

        run_plan(config, out_dir, as_json)
        return
    stack_plan = build_stack_plan(config)
    artifacts = render_artifacts(stack_plan)
    # Pulumi only now: the program runs under in-process mocks, the offline preview.
    from infra.plan.scaling import describe_scaling, ladder_types
    from infra.preview.offline import preview_resources, resource_tree_text, resources_json
    from infra.preview.policies import policy_config, require_pack_passes

    records = preview_resources(stack_plan, preview=True)
    pack_config = policy_config(ladder_types(stack_plan))
    require_pack_passes(records, pack_config)
    replacements = _replacements_since(stack_plan, since) if since is not None else []
    artifacts = artifacts.with_files(
        {
            "resources.json": resources_json(records),
            "policy-config.json": json.dumps(pack_config, indent=2) + "\n",
        }
    )
    target = out_dir or Path("build") / stack
    written = write_artifacts(artifacts, target)
    from infra.cli.stack_report import defaults_in_effect, stack_fleet_cost

    cost = stack_fleet_cost(stack_plan)
    defaults = defaults_in_effect(config)
    warnings = _plan_warnings(stack_plan)
    for warning in warnings:
        _warn(warning)
    if as_json:
        _print_json(
            {
                "stack": stack,
                **stack_plan.plan.summary().as_json(),
                **_price_json(stack_plan.plan),
                "serve_argv": stack_plan.serve_argv,
                "argv_validation": stack_plan.argv_validation,
                "alternatives": _alternatives_json(stack_plan.plan),
                "scaling": describe_scaling(stack_plan),
                "resources": len(records),
                "policy_violations": 0,
                "replacements": [r.line() for r in replacements],
                "artifacts": [str(p) for p in written],
                "fleet_cost": cost.as_json(),
                "defaults_in_effect": defaults,
                "fallback_ladder": ladder_explanation(stack_plan.plan),
                "warnings": warnings,
            }
        )
        return
    out.print(f"[bold]Stack {stack}[/bold]: {config.model.catalog or config.model.repo} in {config.region}")
    stated = config.workload.model_fields_set
    _print_plan(stack_plan.plan, "" if stated else " (defaults: the stack has no vllm-fleet:workload)")
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
    if since is not None:
        out.print(f"\n[bold]Since {since}[/bold]: {len(replacements) or 'no'} resource(s) must be replaced")
        for replacement in replacements:
            out.print(f"[bold red]  ± {replacement.line()}[/bold red]")
    out.print(f"\nArtifacts written to {target}/:")
    for path in written:
        out.print(f"  {path.relative_to(target)}")


def workload_from_options(options: dict[str, float | int | None], max_model_len: int) -> Workload:
    """The `size` command's workload: given options, else the data's defaults (one line per bad value)."""
    for key, value in options.items():
        if value is not None and not value > 0:
            raise FleetError(f"{key} = {value}: must be positive")
    if options["--peak-rps"] is not None and options["--concurrent-users"] is not None:
        raise FleetError("--peak-rps and --concurrent-users: give one of them, not both")
    base = default_workload()
    workload = Workload(
        input_tokens=int(options["--input-tokens"] or base.input_tokens),
        output_tokens=int(options["--output-tokens"] or base.output_tokens),
        ttft_p95_ms=float(options["--ttft-p95-ms"] or base.ttft_p95_ms),
        itl_p95_ms=float(options["--itl-p95-ms"] or base.itl_p95_ms),
        peak_requests_per_s=float(options["--peak-rps"]) if options["--peak-rps"] is not None else None,
        concurrent_users=int(options["--concurrent-users"]) if options["--concurrent-users"] is not None else None,
    )
    if workload.input_tokens + workload.output_tokens > max_model_len:
        raise FleetError(
            f"--input-tokens + --output-tokens = {workload.input_tokens + workload.output_tokens}: "
            f"exceeds --max-model-len {max_model_len}"
        )
    return workload


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


def _replacements_since(stack_plan: StackPlan, since: Path) -> list[Any]:
    """What `pulumi up` would replace going from the stack file in ``since`` to this one: both
    programs run under the same mocks, diffed against the provider's ForceNew table."""
    from infra.preview.offline import run_stack
    from infra.preview.replacement import day2_diff

    before = build_stack_plan(load_stack_file(stack_plan.config.stack, since), validate=False)
    return list(day2_diff(run_stack(before, preview=False).records, run_stack(stack_plan, preview=False).records).replaced)


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
            "performance": performance_json(c) if c.serving is not None and c.feasible else None,
            "why_not_chosen": _why_lost(plan, c),
        }
        for c in plan.alternatives
    ]


def _why_lost(plan: Plan, cand: Candidate) -> str:
    if not cand.feasible:
        return cand.reason
    mine, theirs = plan.chosen.usd_per_million_tokens, cand.usd_per_million_tokens
    if mine is not None and theirs is not None and cand.serving and cand.serving.performance:
        perf = cand.serving.performance
        return (
            f"${theirs:,.2f} per 1M tokens vs ${mine:,.2f} at the SLO ({perf.output_tokens_per_s:,.0f} tok/s "
            f"at batch {perf.batch}, TTFT {perf.ttft_ms:,.0f} ms, ITL {perf.itl_ms:.1f} ms, "
            f"${cand.hourly_usd_per_replica or 0:,.2f}/h)"
        )
    if mine is not None and theirs is None:
        return "no performance prediction: ranked after the predicted layouts"
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


def _print_plan(plan: Plan, workload_note: str = "") -> None:
    s = plan.summary()
    req = plan.request
    chosen = plan.chosen
    mem = chosen.memory
    assert mem is not None
    decision = Table(title="Decision", show_header=False, title_justify="left")
    decision.add_column("", style="bold")
    decision.add_column("")
    decision.add_row("model", f"{req.model_name} ({req.arch.params / 1e9:.1f}B params), {req.quantization}")
    decision.add_row("instance", f"{s.instance_type} ({s.gpu})")
    decision.add_row("replica", _layout_text(chosen) + f" = {s.gpus_per_replica} GPU(s)")
    decision.add_row("vLLM", f"--max-model-len {req.max_model_len} --max-num-seqs {plan.max_num_seqs} "
                     f"--max-num-batched-tokens {plan.max_num_batched_tokens} "
                     f"--gpu-memory-utilization {s.gpu_memory_utilization}")
    decision.add_row("weights", f"{plan.weights_bytes / GB:,.1f} GB total, {mem.weights / GiB:,.2f} GiB per GPU")
    decision.add_row("KV cache", f"{plan.kv_cache_bytes_per_token:,} B/token (model); "
                     f"{chosen.kv_cache_tokens:,} tokens per replica = "
                     f"{plan.concurrent_full_context_seqs} sequences at {req.max_model_len:,}")
    decision.add_row("cost", f"${s.hourly_usd:,.2f}/h per replica ({chosen.price_basis})"
                     + _per_token_text(plan.chosen))
    decision.add_row("time to ready", f"{s.time_to_ready_s} s from {s.weights_source} "
                     f"(timeouts use {s.startup_timeout_s} s)")
    decision.add_row("fallback ladder", "\n".join(ladder_explanation(plan)))
    out.print(_folded(decision))
    _print_performance(plan, workload_note)

    budget = Table(title="Per-GPU memory budget (GiB)", title_justify="left")
    for col in ("GPU", "usable", "weights", "activation", "CUDA graphs", "non-torch", "NCCL", "KV cache"):
        budget.add_column(col, justify="right")
    budget.add_row(*(f"{v / GiB:,.2f}" for v in (
        mem.gpu_total, mem.usable, mem.weights, mem.activation, mem.cuda_graphs, mem.non_torch,
        mem.nccl, mem.kv_cache)))
    out.print(_folded(budget))

    alts = Table(title="Runner-ups (best layout per instance type) and rejects", title_justify="left")
    for col in ("instance", "layout", "$/h/replica", "$/1M tok", "why not chosen"):
        alts.add_column(col)
    for c in plan.alternatives:
        if c.feasible:
            cost = f"{c.hourly_usd_per_replica:,.2f}" if c.hourly_usd_per_replica is not None else "-"
            per_token = f"{c.usd_per_million_tokens:,.2f}" if c.usd_per_million_tokens is not None else "-"
            alts.add_row(c.layout.instance_type, _layout_text(c), cost, per_token, _why_lost(plan, c))
    rejected_types = sorted({c.layout.instance_type for c in plan.alternatives if not c.feasible})
    for name in rejected_types:
        best = _closest_reject(plan, name)
        alts.add_row(name, _layout_text(best), "-", "-", best.reason)
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


def _per_token_text(cand: Candidate) -> str:
    per_token = cand.usd_per_million_tokens
    return f"; ${per_token:,.2f} per 1M output tokens at the SLO" if per_token is not None else ""


def _print_performance(plan: Plan, workload_note: str) -> None:
    """The workload, the SLO, and what one replica is predicted to deliver at it."""
    wl = plan.workload
    perf_table = Table(title="Workload and SLO → serving point (performance model)", show_header=False,
                       title_justify="left")
    perf_table.add_column("", style="bold")
    perf_table.add_column("")
    peak = (
        f"{wl.peak_requests_per_s:g} requests/s" if wl.peak_requests_per_s is not None
        else f"{wl.concurrent_users} concurrent users" if wl.concurrent_users is not None else "not stated"
    )
    perf_table.add_row("workload", f"{wl.input_tokens:,} → {wl.output_tokens:,} tokens per request; peak {peak}"
                       + workload_note)
    perf_table.add_row("SLO", f"TTFT p95 ≤ {wl.ttft_p95_ms:,.0f} ms, inter-token latency p95 ≤ {wl.itl_p95_ms:g} ms")
    serving, capacity = plan.chosen.serving, plan.chosen.capacity
    assert serving is not None
    perf = serving.performance
    perf_table.add_row("batch", f"--max-num-seqs {serving.max_num_seqs}: {serving.reason}")
    if perf is not None:
        perf_table.add_row("predicted", f"TTFT {perf.ttft_ms:,.0f} ms, ITL {perf.itl_ms:.1f} ms, "
                           f"{perf.output_tokens_per_s:,.0f} output tok/s, {perf.requests_per_s:.2f} req/s per replica "
                           "(steady-state means; AIConfigurator)")
    if capacity is not None and capacity.replicas_needed is not None and capacity.peak_requests_per_s is not None:
        assert capacity.headroom is not None
        perf_table.add_row("at peak", f"{capacity.peak_requests_per_s:,.2f} req/s needs {capacity.replicas_needed} "
                           f"replica(s); headroom {capacity.headroom:.0%}")
    out.print(perf_table)


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
    from infra.plan.scaling import describe_scaling

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
