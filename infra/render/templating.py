"""One jinja2 setup for templates of shell scripts, units and cloud-config.

StrictUndefined (a missing value is an error, never an empty string), no autoescape (the
output is not HTML), and comments as ``{## ##}``: bash's ``${#array[@]}`` would otherwise
open a jinja comment.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jinja2

BASE_FILTERS: dict[str, Callable[..., Any]] = {
    "sh_quote": shlex.quote,
    "json": lambda value: json.dumps(value),
    "yaml_str": lambda value: json.dumps(str(value), ensure_ascii=False),
}


def script_environment(template_dir: Path) -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(template_dir)),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        autoescape=False,
        comment_start_string="{##",
        comment_end_string="##}",
    )
    env.filters.update(BASE_FILTERS)
    return env
