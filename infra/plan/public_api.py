"""What the public listener forwards and what it answers otherwise: the ALB's rules
(infra/components/endpoint.py) and the tests' local haproxy that mirrors them.

The single source is ``vllm_api_routes`` in infra/facts/data/aws_fleet.yaml (cited there), the
same list infra/components/endpoint.py turns into the ALB's listener rules (a method
condition plus a path-pattern condition each); every other request gets the listener's
fixed-response 404. The routes are exact paths (ALB path patterns without wildcards are
exact, case-sensitive matches on the path, never the query string), and the method counts.
Pure: no Pulumi, so tests and CI smoke runs can use it without the engine.
"""

from __future__ import annotations

from infra.facts.aws import aws_fleet_facts

# The listener's default action (infra/components/endpoint.py: fixed-response, status "404").
DENIED_STATUS = 404
NOT_FOUND_BODY = '{"error": {"message": "not found", "code": 404}}'


def api_routes() -> list[tuple[str, str]]:
    """(method, path) of every route the public listener forwards."""
    return [(route.method, route.path) for route in aws_fleet_facts().vllm_api_routes.value]


def routes_by_method() -> dict[str, list[str]]:
    grouped: dict[str, list[str]] = {}
    for method, path in api_routes():
        grouped.setdefault(method, []).append(path)
    return grouped


def is_public(method: str, path: str) -> bool:
    """Would the public listener forward this request (query string ignored, as the ALB does)?"""
    return (method, path.split("?", 1)[0]) in api_routes()
