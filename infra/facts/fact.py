"""The one model of a fact with a source: every data file in ``infra/facts/data/`` (and
``images/facts.yaml``, the monitoring host's pins) states where each value was read and when.

``Cited`` is a record that carries its own ``source`` and ``read`` date beside its fields;
``Fact[T]`` is one value of type T with them. Both are strict (an unknown key is an error, so
a typo in a data file fails loudly) and frozen. ``read_yaml`` is how every data file is read.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Annotated, Any, Generic, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field

T = TypeVar("T")

NonEmptyStr = Annotated[str, Field(min_length=1)]


class Strict(BaseModel):
    """A frozen schema that refuses unknown keys."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Cited(Strict):
    """Every fact carries where it came from and when it was read."""

    source: str = Field(min_length=8)
    read: dt.date


class Fact(Cited, Generic[T]):
    """One value with where it came from and when it was read."""

    value: T


def read_yaml(path: Path) -> Any:
    with path.open(encoding="utf-8") as fh:
        return yaml.safe_load(fh)
