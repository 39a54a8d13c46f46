"""PromQL and rule-file helpers for the monitoring tests (test-only: nothing in infra/ calls them)."""

from __future__ import annotations

import re
from typing import Any

import yaml

_PROMQL_STRING = re.compile(r"\"(?:[^\"\\]|\\.)*\"|'(?:[^'\\]|\\.)*'|`[^`]*`")
_PROMQL_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_PROMQL_NUMBER = re.compile(
    r"(?<![A-Za-z0-9_:])(?:0[xX][0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)(?![A-Za-z0-9_:])"
)
_PROMQL_IDENTIFIER = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
_PROMQL_WORDS = {
    "and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right",
    "bool", "offset", "inf", "nan",
}  # fmt: skip


def metric_names_in(expr: str) -> set[str]:
    """Metric names an expression selects (``name{...}`` or bare ``name``).

    It strips strings, label matchers, range and subquery brackets, grouping clauses and number
    literals, then keeps identifiers that are neither keywords nor function calls. Selectors
    written as ``{__name__="..."}`` are not recognised; the fleet's expressions do not use them.
    """
    text = _PROMQL_STRING.sub(" ", expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\boffset\s+-?\w+", " ", text)
    text = _PROMQL_GROUPING.sub(" ", text)
    text = _PROMQL_NUMBER.sub(" ", text)
    names = set()
    for match in _PROMQL_IDENTIFIER.finditer(text):
        word = match.group(0)
        if word.lower() in _PROMQL_WORDS or text[match.end() :].lstrip().startswith("("):
            continue
        names.add(word)
    return names


def rule_groups(rules_yaml: str) -> list[dict[str, Any]]:
    groups: list[dict[str, Any]] = yaml.safe_load(rules_yaml)["groups"]
    return groups


def recording_rule_names(rules_yaml: str) -> set[str]:
    return {
        rule["record"] for group in rule_groups(rules_yaml) for rule in group["rules"] if "record" in rule
    }


def alert_rules(rules_yaml: str) -> dict[str, dict[str, Any]]:
    return {
        rule["alert"]: rule for group in rule_groups(rules_yaml) for rule in group["rules"] if "alert" in rule
    }
