"""The one jinja2 environment: templates of shell scripts, systemd units, cloud-config and
Prometheus/Alertmanager/Grafana YAML (render/), the rotation script (ops/) and the test haproxy.

StrictUndefined (a missing value is an error, never an empty string), no autoescape (the
output is not HTML), and comments as ``{## ##}``: bash's ``${#array[@]}`` would otherwise
open a jinja comment. Each template set adds its own filters (systemd quoting for units,
PromQL numbers for rules).
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Callable, Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import jinja2

# infra/render/templates/: one folder per template set (node, monitoring, monitoring-host).
TEMPLATES_DIR = Path(str(resources.files("infra.render") / "templates"))


def yaml_str(value: object) -> str:
    """A YAML double-quoted scalar (JSON strings are valid YAML), safe for any text."""
    return json.dumps(str(value), ensure_ascii=False)


BASE_FILTERS: dict[str, Callable[..., Any]] = {
    "sh_quote": shlex.quote,
    "json": lambda value: json.dumps(value),
    "yaml_str": yaml_str,
}


def template_environment(
    template_dir: Path, filters: Mapping[str, Callable[..., Any]] | None = None
) -> jinja2.Environment:
    """The environment for the templates under ``template_dir``; callers cache it."""
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
    env.filters.update(filters or {})
    return env
