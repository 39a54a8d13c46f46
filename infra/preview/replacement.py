"""Which resources a change would replace, computed the way the provider decides it.

Pulumi's mocks compute no replacement, so this diffs the mocked inputs of two runs of the
program (before and after a change) against the provider's replace-on-change properties
(``infra/facts/data/provider_replacements.yaml``) and the program's own ``replaceOnChanges``
options. A replacement cascades: a ForceNew input that names a replaced resource (its id,
ARN or name as the mocks answered them) gets a new value too, so its owner is replaced.

Pure: records in, replacements out; tests/test_day2.py and docs/day2.md build on it.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, Field

from infra.errors import FleetError
from infra.facts.catalog import DATA_DIR
from infra.facts.fact import read_yaml


class ForceNew(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    force_new: tuple[str, ...]
    source: str = Field(min_length=8)


class Versioned(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    types: tuple[str, ...]
    source: str = Field(min_length=8)


class ReplacementTable(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    read: dt.date
    new_version_on_update: Versioned
    types: dict[str, ForceNew]


@cache
def replacement_table() -> ReplacementTable:
    return ReplacementTable.model_validate(read_yaml(DATA_DIR / "provider_replacements.yaml"))


class Record(Protocol):
    """What a replacement needs of a declared resource (infra.preview.offline.ResourceRecord)."""

    @property
    def type(self) -> str: ...
    @property
    def name(self) -> str: ...
    @property
    def custom(self) -> bool: ...
    @property
    def engine_inputs(self) -> dict[str, Any]: ...
    @property
    def options(self) -> dict[str, Any]: ...
    @property
    def id(self) -> str | None: ...
    @property
    def outputs(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class Replacement:
    type: str
    name: str
    because: tuple[str, ...]  # the properties (or "<type> <name> replaced") that force it

    def line(self) -> str:
        return f"{self.type} {self.name} must be replaced ({', '.join(self.because)})"


@dataclass(frozen=True)
class Day2Diff:
    replaced: tuple[Replacement, ...]
    updated: tuple[tuple[str, str], ...]  # (type, name) changed in place
    refreshed: tuple[str, ...]  # groups that roll to a new launch-template version (instance refresh)
    created: tuple[tuple[str, str], ...]
    deleted: tuple[tuple[str, str], ...]
    blocked: tuple[str, ...] = ()  # protected resources the change would replace or delete: refused

    def replaced_names(self) -> set[str]:
        return {r.name for r in self.replaced}


def _at(value: Any, path: str) -> Any:
    """The value at a dotted path; a list on the way maps over its items."""
    head, _, rest = path.partition(".")
    if isinstance(value, list):
        return [_at(item, path) for item in value]
    if not isinstance(value, Mapping):
        return None
    inner = value.get(head)
    return _at(inner, rest) if rest else inner


def _strings(value: Any) -> Iterable[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def _identities(record: Record) -> set[str]:
    """How other resources refer to ``record``: its id, ARN and name as the mocks answered."""
    # Computed string outputs (id, ARN, a generated name, a password's result) change when
    # the resource is replaced; an input ("drain", a tag) stays, and unrelated resources may
    # share it, so it is no identity.
    found = {record.id or ""} | {
        value for key, value in record.outputs.items() if isinstance(value, str) and key not in record.engine_inputs
    }
    return {value for value in found if len(value) > 3}


def force_new_properties(resource_type: str) -> tuple[str, ...]:
    table = replacement_table().types
    if resource_type not in table:
        raise FleetError(
            f"{resource_type}: not in infra/facts/data/provider_replacements.yaml; add its ForceNew properties "
            "(from the provider's schema) before the program declares it"
        )
    return table[resource_type].force_new


def _replace_triggers(record: Record) -> tuple[str, ...]:
    """The inputs whose change replaces ``record``, less those its ignoreChanges option hides
    from the diff (Pulumi then keeps the old value, so nothing is replaced)."""
    triggers = list(force_new_properties(record.type))
    triggers += [p for p in record.options.get("replaceOnChanges", []) if p != "*"]
    if record.type == "aws:ec2/instance:Instance" and record.engine_inputs.get("userDataReplaceOnChange"):
        triggers += ["userData", "userDataBase64"]
    ignored = set(record.options.get("ignoreChanges", []))
    return tuple(t for t in triggers if t not in ignored and t.split(".")[0] not in ignored)


def day2_diff(before: Sequence[Record], after: Sequence[Record]) -> Day2Diff:
    """What `pulumi up` would do going from ``before``'s inputs to ``after``'s (both runs of
    the program under the same mocks, not previews: ids and ARNs must be known)."""
    old = {(r.type, r.name): r for r in before if r.custom}
    new = {(r.type, r.name): r for r in after if r.custom}
    both = sorted(old.keys() & new.keys())
    reasons: dict[tuple[str, str], list[str]] = {}
    for key in both:
        was, now = old[key], new[key]
        if "*" in was.options.get("replaceOnChanges", []) and was.engine_inputs != now.engine_inputs:
            reasons[key] = ["replaceOnChanges: *"]
            continue
        changed = [p for p in _replace_triggers(now) if _at(was.engine_inputs, p) != _at(now.engine_inputs, p)]
        if changed:
            reasons[key] = changed
    versioned_types = replacement_table().new_version_on_update.types
    # Cascade: a ForceNew input naming a replaced resource, or a new version of an updated
    # one, changes with it.
    grew = True
    while grew:
        grew = False
        changed_refs = {ident: ("replaced", key) for key in reasons for ident in _identities(old[key])}
        changed_refs |= {
            ident: ("new version of", key)
            for key in both
            if key not in reasons and key[0] in versioned_types and old[key].engine_inputs != new[key].engine_inputs
            for ident in _identities(old[key])
        }
        for key in both:
            if key in reasons:
                continue
            for prop in _replace_triggers(old[key]):
                hits = [changed_refs[s] for s in _strings(_at(old[key].engine_inputs, prop)) if s in changed_refs]
                if hits:
                    how, (_, name) = hits[0]
                    reasons[key] = [f"{prop} -> {how} {name}"]
                    grew = True
                    break
    updated = tuple(k for k in both if k not in reasons and old[k].engine_inputs != new[k].engine_inputs)
    new_versions = {
        ident for key in updated if key[0] in versioned_types for ident in _identities(old[key])
    }
    refreshed = tuple(
        name
        for (resource_type, name) in both
        if resource_type == "aws:autoscaling/group:Group"
        and (resource_type, name) not in reasons
        and any(s in new_versions for s in _strings(old[(resource_type, name)].engine_inputs))
    )
    deleted = sorted(old.keys() - new.keys())
    blocked = tuple(
        name for key in [*sorted(reasons), *deleted] if old[key].options.get("protect") for name in [key[1]]
    )
    return Day2Diff(
        blocked=blocked,
        replaced=tuple(Replacement(t, n, tuple(reasons[(t, n)])) for t, n in sorted(reasons)),
        updated=updated,
        refreshed=refreshed,
        created=tuple(sorted(new.keys() - old.keys())),
        deleted=tuple(deleted),
    )
