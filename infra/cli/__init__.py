"""The ``vllm-fleet`` command line: ``app`` holds the commands; ``main`` is the console entry point."""


def main() -> None:
    # Imported on call: the CLI's helpers (stack_report, stack_reference, images) import without it.
    from infra.cli.app import main as app_main

    app_main()
