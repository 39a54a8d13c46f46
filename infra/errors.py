"""User-facing errors: one line that names the key, the value and what is allowed."""


class FleetError(Exception):
    """An error the CLI prints as a single line (no traceback) before exiting 2."""

    exit_code = 2
