"""CLI commands for operations; ``register`` adds them to the ``vllm-fleet`` app."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Attach the operations commands (preflight, smoke, rotate-key) to the CLI."""
