"""``vllm-fleet``: size a model, plan a stack offline, and operate a fleet.

Human output is tables; ``--json`` is for machines. Bad input is one line on stderr and
exit status 2, never a traceback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from infra.catalog import default_catalog
from infra.config import (
    PROJECT,
    STACKS_DIR,
    ImagesStackConfig,
    arch_from_config_doc,
    load_any_stack_file,
    load_config_json,
    load_stack_file,
)
from infra.errors import FleetError
from infra.ops.commands import register as register_ops_commands
from infra.planner import GB, Candidate, GiB, Plan, SizingRequest, make_plan, serving_facts
from infra.stackplan import StackPlan, build_stack_plan, write_artifacts

app = typer.Typer(
    name="vllm-fleet",
    help="Production vLLM fleets on AWS: sizing, offline plans and operations.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console(highlight=False)


def _print_json(doc: Any) -> None:
    sys.stdout.write(json.dumps(doc, indent=2, sort_keys=False) + "\n")


def _model_request(model: str) -> tuple[str, Any]:
    catalog = default_catalog()
    if model in catalog.models:
        return model, catalog.models[model]
    path = Path(model)
    if path.suffix == ".json" or path.exists():
        doc = load_config_json(path, key="--model")
        return path.parent.name or model, arch_from_config_doc(doc, source=str(path), repo=None)
    raise FleetError(
        f"--model = {model!r}: not a catalog model or a config.json path "
        f"(catalog: {', '.join(sorted(catalog.models))})"
    )


@app.command()
def size(
    model: Annotated[str, typer.Option(help="catalog name (e.g. llama-3.1-70b) or path to a config.json")],
    quantization: Annotated[str, typer.Option(help="fp16, bf16, fp8, int8, awq or gptq")],
    max_model_len: Annotated[int, typer.Option(help="context length in tokens")],
    max_num_seqs: Annotated[
        int | None, typer.Option(help="sequences per replica at full context (default from data)")
    ] = None,
    instance_types: Annotated[
        str | None, typer.Option(help="comma-separated instance types or families")
    ] = None,
    max_nodes: Annotated[int, typer.Option(help="most nodes one replica may span")] = 4,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Pick the instance type, GPUs and vLLM parallelism for one model."""
    catalog = default_catalog()
    if quantization not in catalog.quantizations:
        raise FleetError(
            f"--quantization = {quantization!r}: not known (allowed: {', '.join(catalog.quantizations)})"
        )
    if max_model_len < 1:
        raise FleetError(f"--max-model-len = {max_model_len}: must be a positive number of tokens")
    seqs = max_num_seqs if max_num_seqs is not None else serving_facts().defaults.concurrency
    if seqs < 1:
        raise FleetError(f"--max-num-seqs = {seqs}: must be at least 1")
    types = tuple(t.strip() for t in instance_types.split(",") if t.strip()) if instance_types else ()
    known = set(catalog.instances) | {it.family for it in catalog.instances.values()}
    for t in types:
        if t not in known:
            raise FleetError(f"--instance-types: {t!r} is not a known instance type or family")
    name, arch = _model_request(model)
    plan = make_plan(SizingRequest(name, arch, quantization, max_model_len, seqs, types, max_nodes))
    if as_json:
        _print_json({**plan.summary(), "alternatives": _alternatives_json(plan)})
    else:
        _print_plan(plan)


@app.command()
def plan(
    stack: Annotated[str, typer.Argument(help="stack name: reads stacks/Pulumi.<stack>.yaml")],
    out_dir: Annotated[Path | None, typer.Option("--out", help="artifact directory")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
    stacks_dir: Annotated[Path, typer.Option(help="where Pulumi.<stack>.yaml files live")] = STACKS_DIR,
    since: Annotated[
        Path | None,
        typer.Option(help="stacks directory of the deployed version: list what the change would replace"),
    ] = None,
) -> None:
    """Plan a stack offline: the sizing decision, its runner-ups, and rendered artifacts."""
    config = load_any_stack_file(stack, stacks_dir)
    if isinstance(config, ImagesStackConfig):
        from infra.images_plan import run_plan

        run_plan(config, out_dir, as_json)
        return
    stack_plan = build_stack_plan(config)
    # Pulumi only now: the program runs under in-process mocks, the offline preview.
    from infra.components.fleet import ladder_types
    from infra.offline import preview_resources, resource_tree_text, resources_json
    from infra.policies import policy_config, require_pack_passes
    from infra.scaling import describe_scaling

    records = preview_resources(stack_plan, preview=True)
    pack_config = policy_config(ladder_types(stack_plan))
    require_pack_passes(records, pack_config)
    replacements = _replacements_since(stack_plan, since) if since is not None else []
    stack_plan.artifacts["resources.json"] = resources_json(records)
    stack_plan.artifacts["policy-config.json"] = json.dumps(pack_config, indent=2) + "\n"
    target = out_dir or Path("build") / stack
    written = write_artifacts(stack_plan, target)
    if as_json:
        _print_json(
            {
                "stack": stack,
                **stack_plan.plan.summary(),
                "serve_argv": stack_plan.serve_argv,
                "argv_validation": stack_plan.argv_validation,
                "alternatives": _alternatives_json(stack_plan.plan),
                "scaling": describe_scaling(stack_plan),
                "resources": len(records),
                "policy_violations": 0,
                "replacements": [r.line() for r in replacements],
                "artifacts": [str(p) for p in written],
            }
        )
        return
    out.print(f"[bold]Stack {stack}[/bold]: {config.model.catalog or config.model.repo} in {config.region}")
    _print_plan(stack_plan.plan)
    _print_stack_extras(stack_plan)
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


def _replacements_since(stack_plan: StackPlan, since: Path) -> list[Any]:
    """What `pulumi up` would replace going from the stack file in ``since`` to this one: both
    programs run under the same mocks, diffed against the provider's ForceNew table."""
    from infra.offline import run_stack
    from infra.replacement import day2_diff

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
    decision.add_row("cost", f"${s['hourly_usd']:,.2f}/h per replica (on-demand, us-east-1)")
    decision.add_row("time to ready", f"{s['time_to_ready_s']} s from {s['weights_source']} "
                     f"(timeouts use {s['startup_timeout_s']} s)")
    decision.add_row("fallback ladder", " → ".join(s["fallback_instance_types"]))
    out.print(decision)

    budget = Table(title="Per-GPU memory budget (GiB)", title_justify="left")
    for col in ("GPU", "usable", "weights", "activation", "CUDA graphs", "non-torch", "NCCL", "KV cache"):
        budget.add_column(col, justify="right")
    budget.add_row(*(f"{v / GiB:,.2f}" for v in (
        mem.gpu_total, mem.usable, mem.weights, mem.activation, mem.cuda_graphs, mem.non_torch,
        mem.nccl, mem.kv_cache)))
    out.print(budget)

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
    out.print(alts)

    ttr = Table(title="Modeled time to ready by weight source", title_justify="left")
    ttr.add_column("source")
    ttr.add_column("seconds", justify="right")
    for source, seconds in sorted(plan.time_to_ready_by_source.items(), key=lambda kv: kv[1]):
        ttr.add_row(source, f"{seconds:,.0f}")
    out.print(ttr)


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
    for warning in stack_plan.warnings:
        out.print(f"[bold yellow]WARNING: {warning}[/bold yellow]")
    validation = stack_plan.argv_validation
    if validation == "validated":
        out.print("argv: accepted by vLLM's own parser (pinned version)")
    else:
        out.print(f"[bold red]WARNING: {validation}[/bold red]")


register_ops_commands(app)


def main() -> None:
    try:
        app(standalone_mode=False)
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
