"""Smoke test of a deployed endpoint, as a client sees it through the load balancer.

Checks, each independent (one failing does not hide the others):
- models: the official ``openai`` client lists the models (and finds ``--model`` if given);
- chat: one chat completion returns text and counts output tokens;
- stream: one streamed chat completion; measures time to first token and output tokens/s;
- auth: a raw GET /v1/models without a key gets 401 (the key really guards the API);
- metrics hidden: a raw GET /metrics gets 404 from the load balancer (vLLM itself serves
  /metrics without a key, so only the listener's path allowlist hides it).
The streamed request sets vLLM's ``ignore_eos`` so it always generates ``max_tokens``
tokens, which makes tokens/s comparable between runs.
"""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from infra.errors import FleetError


class CheckFailed(Exception):
    """A smoke check's expectation did not hold; the message says what was seen."""


def require(condition: object, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


@dataclass(frozen=True)
class SmokeCheck:
    name: str
    ok: bool
    detail: str


@dataclass
class SmokeResult:
    checks: list[SmokeCheck] = field(default_factory=list)
    model: str | None = None
    ttft_s: float | None = None
    output_tokens: int | None = None
    output_tokens_per_s: float | None = None

    @property
    def failed(self) -> list[SmokeCheck]:
        return [c for c in self.checks if not c.ok]


def api_base(url: str) -> str:
    """``https://host[:port]`` from what the user gave (with or without ``/v1``)."""
    base = url.strip().rstrip("/").removesuffix("/v1")
    if not base.startswith(("http://", "https://")):
        raise FleetError(f"URL = {url!r}: must start with http:// or https://")
    return base


def http_status(url: str, *, headers: dict[str, str] | None = None, timeout_s: float = 30.0) -> int:
    """Status of a plain GET (no client library, no retries, no key unless given)."""
    request = urllib.request.Request(url, headers=headers or {}, method="GET")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return int(response.status)
    except urllib.error.HTTPError as err:
        return int(err.code)


# What a load balancer answers while it has no healthy target (ALB: 503; a gateway error on
# the way: 502/504); any other status means vLLM itself answered.
NO_HEALTHY_TARGET = (502, 503, 504)


def wait_until_serving(
    url: str,
    wait_s: float,
    *,
    poll_s: float = 10.0,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Poll GET /v1/models (no key) until vLLM answers through the load balancer (401 or 200),
    for at most ``wait_s``: right after `pulumi up` the first nodes may still be loading.
    Returns the status; FleetError with the last one seen when time runs out."""
    base = api_base(url)
    deadline = clock() + wait_s
    while True:
        try:
            status: int | str = http_status(f"{base}/v1/models", timeout_s=min(30.0, max(wait_s, 1.0)))
        except OSError as err:  # DNS not yet propagated, connection refused
            status = f"{type(err).__name__}: {err}"
        if isinstance(status, int) and status not in NO_HEALTHY_TARGET:
            return status
        if clock() >= deadline:
            raise FleetError(f"{base}: no vLLM answered within {wait_s:.0f} s (last: {status})")
        sleep(poll_s)


def _run(name: str, result: SmokeResult, body: Callable[[], str]) -> None:
    import openai

    try:
        detail = body()
    except CheckFailed as err:
        result.checks.append(SmokeCheck(name, False, str(err)))
    except (openai.OpenAIError, OSError, ValueError) as err:  # client/network errors: a failed check
        text = f"{type(err).__name__}: {err}".replace("\n", " ")
        result.checks.append(SmokeCheck(name, False, text[:300]))
    else:
        result.checks.append(SmokeCheck(name, True, detail))


def run_smoke(
    url: str,
    api_key: str,
    *,
    model: str | None = None,
    expect_metrics_hidden: bool = True,
    max_tokens: int = 32,
    timeout_s: float = 120.0,
    clock: Callable[[], float] = time.perf_counter,
) -> SmokeResult:
    import openai

    base = api_base(url)
    client = openai.OpenAI(base_url=f"{base}/v1", api_key=api_key, max_retries=0, timeout=timeout_s)
    result = SmokeResult(model=model)
    messages: list[Any] = [{"role": "user", "content": "Say hello in five words."}]

    def models() -> str:
        ids = [m.id for m in client.models.list().data]
        require(ids, "GET /v1/models listed no model")
        if model is not None:
            require(model in ids, f"model {model!r} not served (served: {', '.join(ids)})")
        else:
            result.model = ids[0]
        return f"served: {', '.join(ids)}"

    def model_to_ask() -> str:
        if not result.model:
            raise CheckFailed("no model to ask (listing models failed and --model was not given)")
        return result.model

    def chat() -> str:
        response = client.chat.completions.create(model=model_to_ask(), messages=messages, max_tokens=max_tokens)
        require(response.choices, "no choices in the response")
        tokens = response.usage.completion_tokens if response.usage else 0
        require(tokens > 0, "the completion has no output tokens")
        return f"{tokens} output tokens, finish_reason {response.choices[0].finish_reason}"

    def stream() -> str:
        name = model_to_ask()
        started = clock()
        first: float | None = None
        last: float | None = None
        usage_tokens: int | None = None
        chunks = client.chat.completions.create(
            model=name,
            messages=messages,
            max_tokens=max_tokens,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        for chunk in chunks:
            if chunk.choices and chunk.choices[0].delta.content is not None:
                now = clock()
                first = first if first is not None else now
                last = now
            if chunk.usage is not None:
                usage_tokens = chunk.usage.completion_tokens
        if first is None or last is None:
            raise CheckFailed("the stream carried no content")
        if not usage_tokens:
            raise CheckFailed("the stream's final usage chunk reported no output tokens")
        result.ttft_s = first - started
        result.output_tokens = usage_tokens
        if usage_tokens > 1 and last > first:
            # Decode rate: the tokens after the first, over the time they took.
            result.output_tokens_per_s = (usage_tokens - 1) / (last - first)
        rate = f"{result.output_tokens_per_s:.1f} tokens/s" if result.output_tokens_per_s else "rate n/a"
        return f"TTFT {result.ttft_s * 1000:.0f} ms, {usage_tokens} tokens, {rate}"

    def auth() -> str:
        status = http_status(f"{base}/v1/models", timeout_s=timeout_s)
        require(status == 401, f"GET /v1/models without a key returned {status}, expected 401")
        return "GET /v1/models without a key: 401"

    def metrics_hidden() -> str:
        status = http_status(f"{base}/metrics", timeout_s=timeout_s)
        require(status == 404, f"GET /metrics returned {status}, expected 404 from the load balancer's allowlist")
        return "GET /metrics: 404"

    _run("models", result, models)
    _run("chat completion", result, chat)
    _run("streamed completion", result, stream)
    _run("401 without key", result, auth)
    if expect_metrics_hidden:
        _run("/metrics hidden", result, metrics_hidden)
    return result
