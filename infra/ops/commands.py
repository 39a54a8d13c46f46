"""CLI commands for operations; ``register`` adds them to the ``vllm-fleet`` app.

- ``preflight STACK``: can the stack deploy here (offerings, quotas, image, certificate,
  capacity reservation)? Exit 1 on a blocker.
- ``smoke URL``: the endpoint works for a client and hides what it must. Exit 1 on a failure.
- ``rotate-key STACK``: a new API key with no failed request (two rolling restarts).
- ``bench STACK --url URL``: load at the stack's workload over a sweep of rates, against the
  plan's prediction (infra/ops/bench.py). Exit 1 when no rate completed.
Bad input exits 2 with one line (infra.errors.FleetError, printed by infra/cli/app.py).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import botocore.exceptions  # type: ignore[import-untyped]
import typer
from rich.console import Console
from rich.table import Table

from infra.config import STACKS_DIR, load_stack_file
from infra.errors import FleetError
from infra.facts.workload import Workload
from infra.ops.api_keys import check_key, new_api_key, read_secret_keys
from infra.ops.aws import client_factory, credentials_error, error_text
from infra.plan.build import build_stack_plan

out = Console(highlight=False)
err_out = Console(stderr=True, highlight=False)
STATUS_STYLE = {"pass": "green", "warn": "yellow", "fail": "bold red"}


def _aws_errors(err: Exception) -> FleetError:
    return credentials_error(err) or FleetError(f"AWS: {error_text(err)}")


def preflight(
    stack: Annotated[str, typer.Argument(help="stack name: reads stacks/Pulumi.<stack>.yaml", metavar="STACK")],
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
    stacks_dir: Annotated[Path, typer.Option(help="where Pulumi.<stack>.yaml files live", metavar="DIR", show_default="stacks/")] = STACKS_DIR,
) -> None:
    """Check the account and region before a deploy; exit 1 on any blocker."""
    from infra.ops.preflight import evaluate, fetch_facts, fleet_need, has_blocker, results_json

    config = load_stack_file(stack, stacks_dir)
    # The argv check needs vLLM imported (slow) and is plan's job; preflight needs the sizing.
    need = fleet_need(build_stack_plan(config, validate=False))
    try:
        facts = fetch_facts(need, client_factory(config.region))
    except botocore.exceptions.BotoCoreError as err:
        raise _aws_errors(err) from None
    results = evaluate(need, facts)
    if as_json:
        sys.stdout.write(json.dumps({"stack": stack, "region": config.region, "checks": results_json(results)}, indent=2) + "\n")
    else:
        table = Table(title=f"Preflight: {stack} in {config.region}", title_justify="left")
        for col in ("check", "status", "detail", "fix"):
            table.add_column(col, overflow="fold")
        for r in results:
            table.add_row(r.check, f"[{STATUS_STYLE[r.status]}]{r.status}[/]", r.detail, r.fix)
        out.print(table)
        counts = {s: sum(r.status == s for r in results) for s in ("pass", "warn", "fail")}
        out.print(f"{counts['pass']} pass, {counts['warn']} warn, {counts['fail']} fail")
    if has_blocker(results):
        raise SystemExit(1)  # typer.Exit is swallowed by app(standalone_mode=False)


def _key_from(key_env: str | None, secret_id: str | None, region: str | None) -> str:
    if (key_env is None) == (secret_id is None):
        raise FleetError("give exactly one of --key-env VAR or --secret-id ID (with --region)")
    if key_env is not None:
        value = os.environ.get(key_env)
        if not value:
            raise FleetError(f"--key-env {key_env}: the environment variable is not set or empty")
        return value
    if region is None:
        raise FleetError("--secret-id needs --region (the secret's region)")
    assert secret_id is not None
    try:
        return read_secret_keys(client_factory(region)("secretsmanager"), secret_id)[0]
    except botocore.exceptions.ClientError as err:
        raise FleetError(f"--secret-id {secret_id}: {error_text(err)}") from None
    except botocore.exceptions.BotoCoreError as err:
        raise _aws_errors(err) from None


def smoke(
    url: Annotated[str, typer.Argument(help="the endpoint, e.g. https://llm.example.com (with or without /v1)", metavar="URL")],
    model: Annotated[str | None, typer.Option(help="served model name; default: the first listed", metavar="NAME")] = None,
    key_env: Annotated[str | None, typer.Option(help="environment variable holding the API key", metavar="VAR")] = None,
    secret_id: Annotated[
        str | None, typer.Option(help="Secrets Manager secret with the key (its first key is used)", metavar="ID")
    ] = None,
    region: Annotated[str | None, typer.Option(help="the secret's region", metavar="REGION")] = None,
    expect_metrics_hidden: Annotated[
        bool,
        typer.Option(help="require 404 for /metrics (off only against a bare vLLM, which serves it)"),
    ] = True,
    max_tokens: Annotated[int, typer.Option(help="tokens to generate per request", metavar="N")] = 32,
    timeout_s: Annotated[float, typer.Option(help="per-request timeout, seconds", metavar="SECONDS")] = 120.0,
    wait_s: Annotated[
        float,
        typer.Option(help="first wait up to this long for vLLM to answer through the load balancer", metavar="SECONDS"),
    ] = 0.0,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Smoke-test a deployed endpoint with the OpenAI client; exit 1 on any failed check."""
    from infra.ops.smoke import run_smoke, wait_until_serving

    if max_tokens < 2:
        raise FleetError(f"--max-tokens = {max_tokens}: at least 2 (tokens/s needs two tokens)")
    api_key = _key_from(key_env, secret_id, region)
    if wait_s > 0:
        wait_until_serving(url, wait_s)
    result = run_smoke(
        url, api_key, model=model, expect_metrics_hidden=expect_metrics_hidden, max_tokens=max_tokens, timeout_s=timeout_s
    )
    if as_json:
        doc: dict[str, Any] = {
            "url": url,
            "model": result.model,
            "ttft_s": result.ttft_s,
            "output_tokens": result.output_tokens,
            "output_tokens_per_s": result.output_tokens_per_s,
            "checks": [{"check": c.name, "ok": c.ok, "detail": c.detail} for c in result.checks],
        }
        sys.stdout.write(json.dumps(doc, indent=2) + "\n")
    else:
        table = Table(title=f"Smoke test: {url}", title_justify="left")
        for col in ("check", "status", "detail"):
            table.add_column(col, overflow="fold")
        for c in result.checks:
            table.add_row(c.name, "[green]pass[/]" if c.ok else "[bold red]fail[/]", c.detail)
        out.print(table)
        if result.ttft_s is not None:
            rate = f"{result.output_tokens_per_s:.1f}" if result.output_tokens_per_s is not None else "n/a"
            out.print(f"TTFT: {result.ttft_s * 1000:.0f} ms; output: {rate} tokens/s ({result.output_tokens} tokens streamed)")
    for failed in result.failed:
        print(f"smoke: FAILED {failed.name}: {failed.detail}", file=sys.stderr)
    if result.failed:
        raise SystemExit(1)  # typer.Exit is swallowed by app(standalone_mode=False)


def rotate_key(
    stack: Annotated[str, typer.Argument(help="stack name: reads stacks/Pulumi.<stack>.yaml", metavar="STACK")],
    secret_id: Annotated[str | None, typer.Option(help="default: vllm-fleet/<stack>/api-key", metavar="ID")] = None,
    region: Annotated[str | None, typer.Option(help="default: the stack's region", metavar="REGION")] = None,
    target_group_arn: Annotated[
        list[str] | None,
        typer.Option(help="repeatable; default: the target groups tagged vllm-fleet:stack=<stack>", metavar="ARN"),
    ] = None,
    phase: Annotated[
        str, typer.Option(help="all (add then retire), add (both keys valid), or retire (drop the old)", metavar="PHASE")
    ] = "all",
    new_key_env: Annotated[
        str | None, typer.Option(help="environment variable with the new key; default: a random 256-bit key", metavar="VAR")
    ] = None,
    allow_downtime: Annotated[
        bool, typer.Option(help="proceed when a restart leaves no other healthy target")
    ] = False,
    stacks_dir: Annotated[Path, typer.Option(help="where Pulumi.<stack>.yaml files live", metavar="DIR", show_default="stacks/")] = STACKS_DIR,
) -> None:
    """Rotate the fleet's API key with no failed request: add the new key, roll, retire the old, roll."""
    from infra.ops.rotate import (
        Elbv2TargetPool,
        SecretsManagerKeyStore,
        SsmNodeRestarter,
        Timeouts,
        find_target_groups,
        rotate_api_key,
    )

    if phase not in ("all", "add", "retire"):
        raise FleetError(f"--phase = {phase!r}: allowed: all, add, retire")
    config = load_stack_file(stack, stacks_dir)
    stack_plan = build_stack_plan(config, validate=False)
    secret = secret_id or stack_plan.api_key_secret_name
    clients = client_factory(region or config.region)
    new_key = ""
    if phase != "retire":
        if new_key_env is not None:
            value = os.environ.get(new_key_env)
            if not value:
                raise FleetError(f"--new-key-env {new_key_env}: the environment variable is not set or empty")
            new_key = check_key(value, what=f"--new-key-env {new_key_env}")
        else:
            new_key = new_api_key()
    try:
        arns = target_group_arn or find_target_groups(clients("resourcegroupstaggingapi"), stack)
        pool = Elbv2TargetPool(clients("elbv2"), arns)
        startup = stack_plan.plan.startup_timeout_s
        timeouts = Timeouts(
            drain_s=pool.deregistration_delay_s() + 60, restart_s=startup, healthy_s=startup + 120
        )
        report = rotate_api_key(
            SecretsManagerKeyStore(clients("secretsmanager"), secret),
            pool,
            SsmNodeRestarter(clients("ssm")),
            new_key=new_key,
            phase=phase,  # type: ignore[arg-type]
            timeouts=timeouts,
            progress=out.print,
            on_keys_added=lambda: out.print(
                f"Clients: read the new key as the first of {secret}'s keys (vllm-fleet smoke --secret-id does)."
            ),
            allow_downtime=allow_downtime,
        )
    except botocore.exceptions.ClientError as err:
        raise FleetError(f"AWS: {error_text(err)}") from None
    except botocore.exceptions.BotoCoreError as err:
        raise _aws_errors(err) from None
    out.print(
        f"Done: phases {', '.join(report.phases)}; "
        + "; ".join(f"{p}: {len(ids)} node(s) restarted" for p, ids in report.restarted.items())
    )


def bench(
    stack: Annotated[str, typer.Argument(help="stack name: its workload, SLO and plan's prediction")],
    url: Annotated[str, typer.Option(help="the endpoint, e.g. https://llm.example.com or http://127.0.0.1:8000")],
    tokenizer: Annotated[
        str | None, typer.Option(help="tokenizer directory or hub id for the prompts; default: the model's repo")
    ] = None,
    model: Annotated[str | None, typer.Option(help="served model name; default: the stack's")] = None,
    key_env: Annotated[str | None, typer.Option(help="environment variable holding the API key")] = None,
    secret_id: Annotated[
        str | None, typer.Option(help="Secrets Manager secret with the key (its first key is used)")
    ] = None,
    region: Annotated[str | None, typer.Option(help="the secret's region")] = None,
    rates: Annotated[str, typer.Option(help="comma-separated requests/s; inf = all at once")] = "1,2,4,8,inf",
    duration_s: Annotated[float, typer.Option(help="offered load per rate, seconds (bounds each run)")] = 60.0,
    max_requests: Annotated[int, typer.Option(help="most requests per rate")] = 1000,
    max_concurrency: Annotated[int | None, typer.Option(help="client-side cap on requests in flight")] = None,
    input_tokens: Annotated[int | None, typer.Option(help="override the stack's workload.inputTokens")] = None,
    output_tokens: Annotated[int | None, typer.Option(help="override the stack's workload.outputTokens")] = None,
    out_dir: Annotated[Path | None, typer.Option("--out", help="result directory (default build/bench/<stack>)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
    stacks_dir: Annotated[Path, typer.Option(help="where Pulumi.<stack>.yaml files live")] = STACKS_DIR,
) -> None:
    """Load-test an endpoint at the stack's workload over a sweep of rates (vLLM's `vllm bench serve`),
    and compare with the plan's prediction: a table, bench.json and bench.png."""
    from infra.ops import bench as bench_driver
    from infra.plan.node.serve_args import served_model_name
    from infra.plan.planner import performance_json

    config = load_stack_file(stack, stacks_dir)
    plan = build_stack_plan(config, validate=False).plan
    work = plan.workload
    for key, value in (("--input-tokens", input_tokens), ("--output-tokens", output_tokens),
                       ("--duration-s", duration_s), ("--max-requests", max_requests),
                       ("--max-concurrency", max_concurrency)):
        if value is not None and not value > 0:
            raise FleetError(f"{key} = {value}: must be positive")
    try:
        sweep = bench_driver.parse_rates(rates)
    except ValueError as err:
        raise FleetError(str(err)) from None
    perf = performance_json(plan.chosen)
    prediction = bench_driver.Prediction(
        max_num_seqs=perf["max_num_seqs"], output_tokens_per_s=perf["output_tokens_per_s"],
        requests_per_s=perf["requests_per_s"], ttft_ms=perf["ttft_ms"], itl_ms=perf["itl_ms"],
    ) if perf["predicted"] else None
    workload = Workload(
        input_tokens or work.input_tokens, output_tokens or work.output_tokens, work.ttft_p95_ms, work.itl_p95_ms
    )
    api_key = _key_from(key_env, secret_id, region)
    target = out_dir or Path("build") / "bench" / stack
    result = bench_driver.run_sweep(
        base_url=url.rstrip("/").removesuffix("/v1"),
        model=model or served_model_name(config, plan.request.model_name),
        tokenizer=tokenizer or config.model.repo or plan.request.arch.hf_repo,
        workload=workload, rates=sweep, out_dir=target, duration_s=duration_s, max_requests=max_requests,
        max_concurrency=max_concurrency, api_key=api_key, prediction=prediction,
    )
    written = bench_driver.write_outputs(result, target)
    if as_json:
        sys.stdout.write(json.dumps(result.to_json(), indent=2) + "\n")
    else:
        out.file.flush()
        print(bench_driver.table_text(result), flush=True)
        out.print("wrote " + ", ".join(str(p) for p in written.values()))
    if not any(p.completed for p in result.points):
        raise SystemExit(1)


def register(app: typer.Typer) -> None:
    """Attach the operations commands (preflight, smoke, rotate-key, bench) to the CLI."""
    app.command(name="preflight")(preflight)
    app.command(name="smoke")(smoke)
    app.command(name="rotate-key")(rotate_key)
    app.command(name="bench")(bench)
