"""How long a node drains before it stops serving: the load balancer's deregistration delay.

While a target deregisters, the load balancer sends it no new requests but keeps its open
connections for the deregistration delay, then closes them. A streamed completion still
running then is cut. So the delay must outlast the longest stream, not just vLLM's
``--shutdown-timeout``: a stream runs at most ``maxModelLen`` tokens, at no less than
``SLOWEST_STREAM_TOKENS_PER_S`` each. A node that has no request in flight leaves at once (the
lifecycle watcher polls vLLM's in-flight gauge), so the long delay costs time only when a long
stream is really running. The judgment call is recorded in docs/day2.md.
"""

from __future__ import annotations

import math

from infra.config import StackConfig
from infra.facts.aws import aws_fleet_facts

# The slowest per-sequence decode rate the fleet plans for, at full concurrency on the
# smallest GPU a plan may choose (an L4 at its batch limit still decodes faster than this).
SLOWEST_STREAM_TOKENS_PER_S = 20


def longest_stream_s(max_model_len: int) -> int:
    return math.ceil(max_model_len / SLOWEST_STREAM_TOKENS_PER_S)


def deregistration_delay_s(config: StackConfig) -> int:
    """The target groups' deregistration delay: the longest stream or vLLM's shutdown drain,
    whichever is longer, within the load balancer's maximum."""
    wanted = max(config.serving.shutdown_timeout_s, longest_stream_s(config.serving.max_model_len))
    return min(wanted, aws_fleet_facts().lb_deregistration_delay_max_s.value)
