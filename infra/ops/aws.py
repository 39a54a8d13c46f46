"""boto3 clients for the operations commands, and one-line errors for AWS failures.

botocore itself honours ``AWS_ENDPOINT_URL`` (and ``AWS_ENDPOINT_URL_<SERVICE>``), which
is how the tests point every command at a local moto server; nothing here special-cases
it. Clients are made through a ``ClientFactory`` so tests can hand in stubbed ones.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import boto3  # type: ignore[import-untyped]
import botocore.exceptions  # type: ignore[import-untyped]
import botocore.parsers  # type: ignore[import-untyped]

from infra.errors import FleetError

# An AWS call that reached the service but failed: an error answer, or one botocore could
# not parse (a 500 page from a proxy or an emulator).
CALL_ERRORS: tuple[type[Exception], ...] = (
    botocore.exceptions.ClientError,
    botocore.parsers.ResponseParserError,
)

# service name → a boto3 client for it (``session.client``, or a test's stub)
ClientFactory = Callable[[str], Any]


def client_factory(region: str) -> ClientFactory:
    session = boto3.session.Session(region_name=region)

    def make(service: str) -> Any:
        return session.client(service)

    return make


def error_code(err: botocore.exceptions.ClientError) -> str:
    return str(err.response.get("Error", {}).get("Code", "Unknown"))


def error_text(err: Exception) -> str:
    """A short, one-line description of an AWS error, for tables and messages."""
    if isinstance(err, botocore.exceptions.ClientError):
        message = str(err.response.get("Error", {}).get("Message", "")).replace("\n", " ")
        text = f"{error_code(err)}: {message}" if message else error_code(err)
    else:
        text = str(err).replace("\n", " ")
    return text if len(text) <= 200 else text[:197] + "..."


def credentials_error(err: Exception) -> FleetError | None:
    """Missing or unusable credentials: one line for the user, not a traceback."""
    if isinstance(err, botocore.exceptions.NoCredentialsError | botocore.exceptions.NoRegionError):
        return FleetError(f"AWS: {err} (set AWS_PROFILE or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY)")
    if isinstance(err, botocore.exceptions.EndpointConnectionError):
        return FleetError(f"AWS: cannot reach {err.kwargs.get('endpoint_url', 'the endpoint')}")
    return None
