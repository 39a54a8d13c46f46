"""The API key secret's value format, shared by rotate-key, smoke and the node's fetch script.

The secret ``vllm-fleet/<stack>/api-key`` holds either one plain key, or JSON
``{"keys": [newest, ..., oldest]}`` while a key is being rotated. Nodes accept every key in
the list (infra/render/templates/node/api-keys-to-vllm-config.py.j2 hands them all to vLLM's
``--api-key``, which takes several); clients use the first, newest one. The key rules are
the node converter's, so a value rotate-key writes is one every node accepts.
"""

from __future__ import annotations

import json
import re
import secrets

from infra.errors import FleetError
from infra.render.node import MIN_KEY_LENGTH

VISIBLE_ASCII = re.compile(r"[\x21-\x7e]+")


def check_key(key: str, *, what: str) -> str:
    # Same rule as the node's converter: a leading '-' would read as an option to argparse.
    if len(key) < MIN_KEY_LENGTH or not VISIBLE_ASCII.fullmatch(key) or key.startswith("-"):
        raise FleetError(
            f"{what}: must be at least {MIN_KEY_LENGTH} visible ASCII characters without spaces, "
            "not starting with '-' (value not shown)"
        )
    return key


def parse_secret_value(value: str, *, secret_id: str) -> list[str]:
    """Every key the secret holds, newest first."""
    try:
        doc = json.loads(value)
    except ValueError:
        doc = None
    if isinstance(doc, dict):
        keys = doc.get("keys")
        if set(doc) != {"keys"} or not isinstance(keys, list) or not keys or not all(
            isinstance(k, str) for k in keys
        ):
            raise FleetError(
                f'secret {secret_id}: JSON value must be exactly {{"keys": ["<key>", ...]}} (value not shown)'
            )
    else:
        keys = [value]
    return [check_key(k, what=f"secret {secret_id} key #{i + 1}") for i, k in enumerate(keys)]


def format_secret_value(keys: list[str]) -> str:
    """The JSON form, always: nodes accept it for one key as well as for several."""
    unique = list(dict.fromkeys(keys))
    if not unique:
        raise ValueError("at least one key")
    return json.dumps({"keys": unique})


def new_api_key() -> str:
    """64 hex characters (256 bits): never starts with '-', needs no quoting anywhere."""
    return secrets.token_hex(32)


def read_secret_keys(secretsmanager: object, secret_id: str) -> list[str]:
    """The keys of the secret's current version (AWSCURRENT), newest first."""
    response = secretsmanager.get_secret_value(SecretId=secret_id)  # type: ignore[attr-defined]
    value = response.get("SecretString")
    if not isinstance(value, str):
        raise FleetError(f"secret {secret_id}: has no SecretString (binary secrets are not supported)")
    return parse_secret_value(value, secret_id=secret_id)
