"""The fast tier: `scripts/test --fast` (`pytest -m fast`) runs it, for the edit loop.

A test is fast when it is in a FAST_MODULES module and takes none of SERVER_FIXTURES. A
module joins FAST_MODULES when its tests start no vLLM server, nspawn container, Prometheus or
moto server themselves (a few that take a server fixture are left out one by one) and the
tier still runs in under a minute on the 2-core machine (`scripts/test --fast` prints the
time). Modules that need no server but would break the minute stay in the full tier; measured
on the loaded 2-core machine: test_cli 112 s, test_first_hour 114 s, test_lint 57 s (mypy),
test_day2 56 s, test_program and test_policies (Pulumi programs under the mocks, minutes),
test_node_render 21 s (systemd-analyze, strace), test_scaling and test_monitoring_component
23 s each (Pulumi mocks), test_node_weights and test_preflight 10-20 s, test_input_fuzz 14 s,
test_images_stack 13 s, test_stackplan 11 s and test_scaling_simulation 8 s (they plan the
big stacks), test_vllm_cli 3 s (kept out for the margin). CI always runs everything.
"""

from __future__ import annotations

from pathlib import Path

import pytest

FAST_MODULES = frozenset({
    "test_architecture.py",
    "test_catalog.py",
    "test_config.py",
    "test_docs.py",
    "test_monitoring.py",
    "test_perf.py",
    "test_plan_property.py",
    "test_planner.py",
    "test_tiny_model.py",
    "test_vllm_pin.py",
    "test_vllm_server_helper.py",
    "test_workflows.py",
})

# The fixtures (tests/conftest.py) that start a server or a container.
SERVER_FIXTURES = frozenset({"vllm_server", "moto_server", "moto", "moto_env", "moto_endpoint", "node_rootfs"})


def is_fast(item: pytest.Item) -> bool:
    fixtures = getattr(item, "fixturenames", ())
    return item.path.name in FAST_MODULES and not SERVER_FIXTURES.intersection(fixtures)


class FastTier:
    """Marks the fast tests `fast` (a plugin, so conftest keeps one pytest_collection_modifyitems)."""

    def pytest_ignore_collect(self, collection_path: Path, config: pytest.Config) -> bool | None:
        """Under `-m fast`, the other modules are not even imported (their imports of Pulumi,
        vLLM and boto3 cost seconds, and none of their tests would be selected)."""
        name = collection_path.name
        if config.getoption("markexpr") == "fast" and name.startswith("test_") and name.endswith(".py"):
            return True if name not in FAST_MODULES else None  # None: the other hooks decide
        return None

    @pytest.hookimpl(tryfirst=True)
    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        for item in items:
            if is_fast(item):
                item.add_marker(pytest.mark.fast)
