"""Pulumi under mocks for component and program tests, per the SDK's guidance for 3.27x on
Python 3.12+: every test gets its own event loop, the mocks are set inside the fixture (never
at import time), and Pulumi's global settings are restored afterwards.

General on purpose — any component can be tested with it:

    def test_something(pulumi_mocks):
        harness = pulumi_mocks(preview=False)             # or preview=True
        component = harness.run(lambda: MyComponent("x", MyArgs(...)))
        harness.records("aws:ec2/launchTemplate:LaunchTemplate")   # what was registered
        harness.resolve(component.some_output)            # an Output's value

Resources echo their inputs plus deterministic ids/ARNs/names (infra.preview.offline.OfflineMocks;
extra data sources via ``invoke_handlers={token: fn}``; extra computed outputs per resource
type via ``resource_outputs={type token: fn(name, inputs) -> outputs}``, applied in both
modes, e.g. a StackReference's ``outputs``); every registration is recorded with its inputs
(secrets masked, and unwrapped in ``engine_inputs``) and its options.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import pulumi
import pytest
from pulumi._utils import ContextProperty
from pulumi.runtime import MockResourceArgs, set_mocks, settings
from pulumi.runtime import config as runtime_config
from pulumi.runtime.stack import run_pulumi_func

from infra.preview.offline import OfflineMocks, RecordingMonitor, ResourceRecord

TEST_PROJECT = "vllm-fleet"
TEST_STACK = "test"

OutputsHook = Callable[[str, Mapping[str, Any]], dict[str, Any]]


class _ExtraOutputsMocks(OfflineMocks):
    """OfflineMocks plus per-type computed outputs a test supplies."""

    def __init__(self, *, resource_outputs: Mapping[str, OutputsHook], **options: Any) -> None:
        super().__init__(**options)
        self.resource_outputs = dict(resource_outputs)

    def new_resource(self, args: MockResourceArgs) -> tuple[str | None, dict[Any, Any]]:
        resource_id, outputs = super().new_resource(args)
        hook = self.resource_outputs.get(args.typ)
        if hook is not None:
            outputs.update(hook(args.name, dict(args.inputs)))
        return resource_id, outputs


class PulumiHarness:
    def __init__(self, loop: asyncio.AbstractEventLoop, mocks: OfflineMocks, monitor: RecordingMonitor) -> None:
        self.loop = loop
        self.mocks = mocks
        self.monitor = monitor

    def run(self, program: Callable[[], Any]) -> Any:
        """Run ``program`` as a Pulumi program; wait for every registration and apply.
        Exceptions (also from inside apply callbacks) propagate."""
        result: list[Any] = []
        self.loop.run_until_complete(run_pulumi_func(lambda: result.append(program())))
        return result[0]

    def resolve(self, output: Any) -> Any:
        """An Output's value (None when unknown, as in a preview)."""
        if not isinstance(output, pulumi.Output):
            return output
        return self.loop.run_until_complete(output.future())

    def is_secret(self, output: pulumi.Output[Any]) -> bool:
        return bool(self.loop.run_until_complete(output.is_secret()))

    def records(self, type_token: str | None = None) -> list[ResourceRecord]:
        found = [r for r in self.monitor.records if type_token is None or r.type == type_token]
        return sorted(found, key=lambda r: (r.name, r.type))

    def record(self, type_token: str, name: str) -> ResourceRecord:
        matches = [r for r in self.monitor.records if r.type == type_token and r.name == name]
        assert len(matches) == 1, f"{len(matches)} {type_token} named {name!r}"
        return matches[0]


def _settings_snapshot() -> tuple[dict[str, Any], Any, Any]:
    props = {
        name: getattr(settings.SETTINGS, name)
        for name, attr in vars(settings.Settings).items()
        if isinstance(attr, ContextProperty)
    }
    return props, settings.ROOT.get(), runtime_config.CONFIG.get()


def _settings_restore(snapshot: tuple[dict[str, Any], Any, Any]) -> None:
    props, root, config = snapshot
    for name, value in props.items():
        setattr(settings.SETTINGS, name, value)
    settings.ROOT.set(root)
    runtime_config.CONFIG.set(config)


@pytest.fixture
def pulumi_mocks() -> Iterator[Callable[..., PulumiHarness]]:
    """A factory: ``pulumi_mocks(preview=..., region=..., stack=..., **OfflineMocks kwargs)``.
    Call it once per test; the fixture owns the event loop and restores Pulumi's settings."""
    snapshot = _settings_snapshot()
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    made: list[PulumiHarness] = []

    def make(
        *,
        preview: bool = False,
        region: str = "us-east-1",
        stack: str = TEST_STACK,
        invoke_handlers: Mapping[str, Callable[[Mapping[str, Any]], dict[str, Any]]] | None = None,
        resource_outputs: Mapping[str, OutputsHook] | None = None,
        **mock_options: Any,
    ) -> PulumiHarness:
        assert not made, "one Pulumi program per test"
        mocks = (
            _ExtraOutputsMocks(
                resource_outputs=resource_outputs,
                region=region,
                preview=preview,
                invoke_handlers=invoke_handlers,
                **mock_options,
            )
            if resource_outputs
            else OfflineMocks(region=region, preview=preview, invoke_handlers=invoke_handlers, **mock_options)
        )
        monitor = RecordingMonitor(mocks)
        settings.ROOT.set(None)  # a fresh root stack for this test
        set_mocks(mocks, project=TEST_PROJECT, stack=stack, preview=preview, monitor=monitor)
        harness = PulumiHarness(loop, mocks, monitor)
        made.append(harness)
        return harness

    try:
        yield make
    finally:
        asyncio.set_event_loop(None)
        loop.close()
        _settings_restore(snapshot)
