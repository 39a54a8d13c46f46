"""The fast tier: `scripts/test --fast` runs only the modules listed here, for the edit loop.

A module is fast when it starts no vLLM server, no nspawn container, no Prometheus, no moto
server and no Pulumi program under the mocks, and the whole list runs in under a minute on
the 2-core machine (`scripts/test --fast` prints the time). New modules are in the full tier
until someone adds them here; CI always runs everything.
"""

from __future__ import annotations

import pytest

FAST_MODULES = frozenset({
    "test_architecture.py",
    "test_catalog.py",
    "test_config.py",
    "test_docs.py",
    "test_monitoring.py",
    "test_perf.py",
    "test_planner.py",
    "test_tiny_model.py",
    "test_vllm_server_helper.py",
    "test_workflows.py",
})


class FastTier:
    """Marks every test of a FAST_MODULES module `fast` (a plugin, so conftest keeps one
    pytest_collection_modifyitems)."""

    @pytest.hookimpl(tryfirst=True)
    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        for item in items:
            if item.path.name in FAST_MODULES:
                item.add_marker(pytest.mark.fast)
