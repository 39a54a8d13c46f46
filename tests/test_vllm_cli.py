"""infra.plan.node.vllm_cli checks production argv with the pinned vLLM's own `vllm serve` parser."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import pytest

from infra.errors import FleetError
from infra.facts.vllm_pin import vllm_facts
from infra.plan.node import vllm_cli

PRODUCTION_ARGV = [
    "vllm", "serve", "/opt/models/meta-llama/Llama-3.1-70B-Instruct",
    "--served-model-name", "llama-3.1-70b",
    "--host", "0.0.0.0",
    "--port", "8000",
    "--tensor-parallel-size", "8",
    "--pipeline-parallel-size", "2",
    "--max-model-len", "8192",
    "--max-num-seqs", "256",
    "--max-num-batched-tokens", "8192",
    "--gpu-memory-utilization", "0.9",
    "--enable-prefix-caching",
    "--dtype", "bfloat16",
    "--download-dir", "/opt/models",
    "--shutdown-timeout", "30",
    "--distributed-executor-backend", "ray",
]  # fmt: skip


@pytest.fixture(scope="module")
def serve_parser() -> vllm_cli.ServeParser:
    """Imports vLLM and builds its parser once for the module (about 8-25 s)."""
    return vllm_cli.serve_parser()


def with_value(argv: Sequence[str], flag: str, value: str) -> list[str]:
    out = list(argv)
    out[out.index(flag) + 1] = value
    return out


def rejection(argv: Sequence[str]) -> str:
    with pytest.raises(FleetError) as caught:
        vllm_cli.validate_serve_argv(argv)
    message = str(caught.value)
    assert "\n" not in message, message
    return message


def test_vllm_is_importable() -> None:
    assert vllm_cli.vllm_importable()


def test_parser_is_the_one_vllm_serve_builds(serve_parser: vllm_cli.ServeParser) -> None:
    # The import paths in infra/facts/data/vllm.yaml are the objects `vllm serve` itself uses.
    import vllm.entrypoints.cli.serve as serve_module

    location = vllm_facts().parser
    assert vllm_cli._import_attribute(location.make_arg_parser.value) is serve_module.make_arg_parser
    assert vllm_cli._import_attribute(location.parser_class.value) is serve_module.FlexibleArgumentParser
    assert (
        vllm_cli._import_attribute(location.validate_parsed_args.value)
        is serve_module.validate_parsed_serve_args
    )
    # Same options and defaults as the parser vLLM's ServeSubcommand builds.
    reference_top = serve_module.FlexibleArgumentParser(prog="vllm")
    reference = serve_module.ServeSubcommand().subparser_init(
        reference_top.add_subparsers(required=False, dest="subparser")
    )
    ours = serve_parser.serve
    assert set(ours._option_string_actions) == set(reference._option_string_actions)
    assert ours.parse_args([]) == reference.parse_args([])


def test_production_argv_is_accepted(serve_parser: vllm_cli.ServeParser) -> None:
    namespace = vllm_cli.validate_serve_argv(PRODUCTION_ARGV)
    assert isinstance(namespace, argparse.Namespace)
    assert namespace.model == "/opt/models/meta-llama/Llama-3.1-70B-Instruct"
    assert namespace.served_model_name == ["llama-3.1-70b"]
    assert (namespace.host, namespace.port) == ("0.0.0.0", 8000)
    assert (namespace.tensor_parallel_size, namespace.pipeline_parallel_size) == (8, 2)
    assert (namespace.max_model_len, namespace.max_num_seqs, namespace.max_num_batched_tokens) == (
        8192,
        256,
        8192,
    )
    assert namespace.gpu_memory_utilization == 0.9
    assert namespace.enable_prefix_caching is True
    assert namespace.dtype == "bfloat16"
    assert namespace.download_dir == "/opt/models"
    assert namespace.shutdown_timeout == 30
    assert namespace.distributed_executor_backend == "ray"
    assert namespace.api_key is None


def test_switch_forms_are_accepted(serve_parser: vllm_cli.ServeParser) -> None:
    assert vllm_cli.validate_serve_argv([*PRODUCTION_ARGV, "--no-enforce-eager"]).enforce_eager is False
    assert vllm_cli.validate_serve_argv([*PRODUCTION_ARGV, "--enforce-eager"]).enforce_eager is True


BAD_FLAGS = [
        (["--enable-metrics"], "--enable-metrics", "does not exist"),
        (["--disable-log-requests"], "--disable-log-requests", "does not exist"),
        (["--enforce-eager", "false"], "--enforce-eager", "--no-enforce-eager"),
        (["--enforce-eager=false"], "--enforce-eager", "--no-enforce-eager"),
        (["--max-model", "4096"], "--max-model", "--max-model-len"),
        (["--max_model_len", "4096"], "--max_model_len", "--max-model-len"),
        (["--api-key", "x"], "--api-key", "--config on a systemd credential"),
        (["--api_key=x"], "--api_key", "--config on a systemd credential"),
        (["--model", "other"], "--model", "positional"),
        (["--port", "9000"], "--port", "twice"),
        (["stray"], "stray", "positional"),
]


@pytest.mark.parametrize(("extra", "flag", "also"), BAD_FLAGS)
def test_bad_flags_are_rejected_naming_the_flag(
    serve_parser: vllm_cli.ServeParser, extra: list[str], flag: str, also: str
) -> None:
    message = rejection([*PRODUCTION_ARGV, *extra])
    assert flag in message
    assert also in message


def test_enforce_eager_false_explains_the_right_form(serve_parser: vllm_cli.ServeParser) -> None:
    message = rejection([*PRODUCTION_ARGV, "--enforce-eager", "false"])
    assert "takes no value" in message and "'false'" in message
    assert "--no-enforce-eager" in message and "omit it" in message


@pytest.mark.parametrize(
    ("flag", "value", "reason"),
    [
        ("--max-num-seqs", "abc", "invalid int value: 'abc'"),
        ("--gpu-memory-utilization", "high", "invalid float value: 'high'"),
        ("--dtype", "float8", "invalid choice: 'float8'"),
    ],
)
def test_bad_values_are_rejected_by_vllms_parser(
    serve_parser: vllm_cli.ServeParser, flag: str, value: str, reason: str
) -> None:
    message = rejection(with_value(PRODUCTION_ARGV, flag, value))
    assert flag in message and reason in message


def test_missing_value_is_reported_for_its_flag(serve_parser: vllm_cli.ServeParser) -> None:
    argv = [*PRODUCTION_ARGV[:3], "--host", "--port", "8000"]
    assert "argument --host: expected one argument" in rejection(argv)


def test_vllms_cross_flag_checks_run(serve_parser: vllm_cli.ServeParser) -> None:
    message = rejection([*PRODUCTION_ARGV, "--enable-auto-tool-choice"])
    assert "--enable-auto-tool-choice requires --tool-call-parser" in message


@pytest.mark.parametrize(
    "argv",
    [["vllm"], ["vllm", "serve"], ["vllm", "serve", "--port", "8000"], ["python", "-m", "vllm"]],
)
def test_command_shape_is_checked(serve_parser: vllm_cli.ServeParser, argv: list[str]) -> None:
    assert "vllm" in rejection(argv)


def test_serve_flag_names(serve_parser: vllm_cli.ServeParser) -> None:
    names = vllm_cli.serve_flag_names()
    assert {"--max-model-len", "--enforce-eager", "--no-enforce-eager", "--served-model-name", "-tp"} <= names
    assert "--enable-metrics" not in names and "--disable-log-requests" not in names


# --- the flag table: the same strict walk without vLLM ------------------------------------------


def test_the_flag_table_in_data_is_what_the_pinned_parser_defines(serve_parser: vllm_cli.ServeParser) -> None:
    """Regenerated from the real parser and compared: a vLLM bump that changes a flag fails here
    until `python -m infra.plan.node.vllm_cli --write-flag-table` is run."""
    assert vllm_cli.pinned_flag_table() == serve_parser.table
    assert serve_parser.table.version == vllm_facts().pin.version.value


@pytest.mark.parametrize(("extra", "flag", "also"), BAD_FLAGS)
def test_without_vllm_the_table_rejects_the_same_flags(extra: list[str], flag: str, also: str) -> None:
    with pytest.raises(FleetError) as caught:
        vllm_cli.check_serve_flags([*PRODUCTION_ARGV, *extra])
    message = str(caught.value)
    assert "\n" not in message and flag in message and also in message
    vllm_cli.check_serve_flags(PRODUCTION_ARGV)  # and accepts the production form


def test_the_light_plan_refuses_an_unknown_extra_arg(monkeypatch: pytest.MonkeyPatch) -> None:
    """`vllm-fleet plan` where vLLM is not installed: an unknown flag in extraArgs is a FleetError
    (exit 2 at the CLI), not a warning."""
    from infra.config import load_stack_file
    from infra.plan.build import build_stack_plan

    monkeypatch.setattr(vllm_cli, "vllm_importable", lambda: False)
    config = load_stack_file("dev-8b")
    bad = config.model_copy(update={"serving": config.serving.model_copy(update={"extra_args": ["--enable-metrics"]})})
    with pytest.raises(FleetError, match="--enable-metrics does not exist in vLLM 0.32.0"):
        build_stack_plan(bad)
    assert "flag table" in build_stack_plan(config).argv_validation
