"""``python -m infra`` is the ``vllm-fleet`` CLI."""

from infra.cli import main

main()
