"""A rendered fleet node booted for real: systemd, cloud-init, the secret fetch and vLLM together.

The dev-8b stack's NodeSpec, with only what a CPU and the tiny test model need changed (the
diff is printed), is rendered to user-data and fed to cloud-init's NoCloud datasource in a
Debian rootfs that the image's own bake scripts installed vLLM into (tests/support/rootfs.py).
systemd-nspawn boots it (sharing this host's network, so vLLM answers on 127.0.0.1); the API
key lives in a local moto Secrets Manager. Then: health, the key's path and where it never
shows, a chat completion, and a SIGKILL of vLLM that systemd restarts.

Only one vLLM runs at a time on this machine: each node holds the machine-wide vLLM lock
(tests/support/vllm_server.py), and booting another node stops the previous one.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest

from infra.plan.node.spec import NodeSpec, ReplicaSpec
from infra.render.node import render_user_data
from tests.support.moto import MotoServer
from tests.support.ports import free_port
from tests.support.rootfs import (
    AWS_TEST_CREDENTIALS_DROPIN,
    CPU_NODE_ENV,
    FETCH_KEY_DROPIN_PATH,
    TINY_MODEL_IN_NODE,
    TINY_MODEL_MAX_LEN,
    NodeContainer,
    argv_diff,
    install_tiny_model,
    node_health,
    prepare_node,
    production_node_spec,
    replace_serve_flags,
    seed_nocloud,
    stop_node,
)
from tests.support.vllm_server import CPU_WARMUP_FLAGS

STACK = "dev-8b"
UNIT = "vllm.service"
FETCH_UNIT = "vllm-fleet-fetch-key.service"
MAX_MODEL_LEN = TINY_MODEL_MAX_LEN
HEALTH_TIMEOUT_S = 420
TIMINGS: dict[str, float] = {}


def production_spec() -> NodeSpec:
    """The NodeSpec the dev-8b stack deploys on its chosen instance type."""
    return production_node_spec(STACK)


def cpu_spec(production: NodeSpec, *, port: int, endpoint: str) -> NodeSpec:
    """The production spec with the tiny model and the CPU-needed changes, nothing else."""
    (replica,) = production.replicas
    argv = replace_serve_flags(
        replica.serve_argv,
        TINY_MODEL_IN_NODE,
        {
            # Servers on this shared machine listen on loopback only, on a free port.
            "--host": "127.0.0.1",
            "--port": str(port),
            "--max-model-len": str(MAX_MODEL_LEN),
        },
        # Dynamo + eager backend: the CPU warm-up pass runs, TorchInductor's ~45 s C++ compile
        # does not (CPU_WARMUP_FLAGS says why --enforce-eager is not enough).
        added=CPU_WARMUP_FLAGS,
    )
    return dataclasses.replace(
        production,
        replicas=(ReplicaSpec(argv, port=port),),
        vllm_env={**production.vllm_env, **CPU_NODE_ENV},
        aws_endpoint_url=endpoint,
        # No Auto Scaling group here, so no lifecycle watcher (the spec's switch for exactly
        # this; it would poll instance metadata, which a test must not reach for).
        lifecycle_hooks=dataclasses.replace(production.lifecycle_hooks, enabled=False),
        # Nor the scaling signal (it reads the group from instance metadata): tests/test_node_s3_boot.py
        # boots it with a metadata stand-in and moto's Auto Scaling and CloudWatch.
        scaling_environment={},
    )


# This sandbox's cgroup setup (legacy hierarchies, not delegated to the container) stops the
# container's systemd from killing what is left of a unit whose main process died: it logs
# this and moves on, and vLLM's engine core and worker stay behind, competing with the next
# start's. A real host kills the whole cgroup; the tests do what it would, only when systemd
# reported the failure.
CGROUP_KILL_FAILED = "vllm.service: Failed to kill control group /system.slice/vllm.service"


def reap_leftovers(node: NodeContainer) -> int:
    """SIGKILL what remains of vllm.service once its main process is gone; returns how many."""
    if CGROUP_KILL_FAILED not in node.journal("-u", UNIT, "-o", "cat"):
        return 0
    return node.kill_unit(UNIT)


@dataclass
class BootedNode:
    node: NodeContainer
    spec: NodeSpec
    port: int
    api_key: str
    moto: MotoServer
    served_model_name: str
    boot_to_healthy_s: float = 0.0

    @property
    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key=self.api_key, timeout=120)

    def wait_healthy(self, timeout_s: float = HEALTH_TIMEOUT_S) -> float:
        return self.node.wait_for(lambda: node_health(self.port) == 200, timeout_s, f"{UNIT} /health 200")

    def unit_state(self) -> dict[str, str]:
        return self.node.show(UNIT, "ActiveState", "SubState", "Result", "MainPID", "NRestarts")

    def failure_context(self) -> str:
        return self.node.exec("systemctl", "status", "--no-pager", "-n", "40", UNIT, FETCH_UNIT, check=False).stdout


def boot(
    rootfs: Path, workdir: Path, tiny_llama_dir: Path, moto: MotoServer, name: str, fetch_warn_after: int | None = None
) -> BootedNode:
    """Render the node for a CPU, seed cloud-init, boot it; returns as soon as systemd is up."""
    production = production_spec()
    port = free_port()
    spec = cpu_spec(production, port=port, endpoint=moto.endpoint)
    print(f"\n{STACK} serve argv, production vs this CPU test:\n"
          f"{argv_diff(production.replicas[0].serve_argv, spec.replicas[0].serve_argv)}\n"
          f"environment added: {CPU_NODE_ENV}; lifecycle hooks and scaling signal: off (no Auto Scaling group)")  # fmt: skip
    node = prepare_node(rootfs, workdir, name)
    install_tiny_model(node, tiny_llama_dir)
    dropin = AWS_TEST_CREDENTIALS_DROPIN
    if fetch_warn_after is not None:  # the script's own test switch: say it sooner than after 10 tries
        dropin += f"Environment=VLLM_FLEET_FETCH_WARN_AFTER={fetch_warn_after}\n"
    node.write(FETCH_KEY_DROPIN_PATH, dropin)
    # The Hub token's fetch (dev-8b downloads from the Hub in production) talks to moto too.
    node.write("etc/systemd/system/vllm-fleet-fetch-hf-token.service.d/10-test-aws-credentials.conf",
               AWS_TEST_CREDENTIALS_DROPIN)
    seed_nocloud(node, render_user_data(spec), instance_id=f"i-{name}")
    argv = spec.replicas[0].serve_argv
    served = argv[argv.index("--served-model-name") + 1]
    booted = BootedNode(node, spec, port, "node-boot-" + secrets.token_hex(16), moto, served)
    started = time.monotonic()
    node.boot()
    TIMINGS[f"{name}: nspawn to systemd up"] = time.monotonic() - started
    return booted


@pytest.fixture(scope="module")
def node(
    node_rootfs: Path, tiny_llama_dir: Path, moto: MotoServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[BootedNode]:
    """A node booted with Secrets Manager up, vLLM healthy."""
    workdir = tmp_path_factory.mktemp("node-a")
    production = production_spec()
    api_key = "node-boot-" + secrets.token_hex(16)
    moto.put_secret(production.api_key_secret_id, api_key, production.region)
    booted = boot(node_rootfs, workdir, tiny_llama_dir, moto, "node-a")
    booted.api_key = api_key
    try:
        booted.boot_to_healthy_s = booted.wait_healthy() + TIMINGS["node-a: nspawn to systemd up"]
        TIMINGS["boot to healthy"] = booted.boot_to_healthy_s
        print(f"node-a: boot to /health 200 in {booted.boot_to_healthy_s:.1f} s")
        yield booted
    except Exception:
        print(booted.failure_context() if booted.node.alive else booted.node.console_tail())
        raise
    finally:
        stop_node(booted.node)


def test_cloud_init_ran_the_rendered_user_data_without_errors(node: BootedNode) -> None:
    status = node.node.exec("cloud-init", "status", "--wait", "--long", check=False, timeout=300)
    assert status.returncode == 0, status.stdout + status.stderr
    assert "status: done" in status.stdout
    result = json.loads(node.node.path("/run/cloud-init/result.json").read_text())
    assert result["v1"]["errors"] == [], result
    assert "NoCloud" in result["v1"]["datasource"], result
    # Every runcmd step ran: the target is enabled, and it pulled in the units.
    enabled = node.node.exec("systemctl", "is-enabled", "vllm-fleet.target").stdout.strip()
    assert enabled == "enabled"
    assert node.node.exec("id", "-u", "vllm").returncode == 0
    assert node.node.show(FETCH_UNIT, "ActiveState", "Result") == {"ActiveState": "active", "Result": "success"}


def test_vllm_unit_is_active_and_healthy(node: BootedNode) -> None:
    state = node.unit_state()
    assert state["ActiveState"] == "active" and state["SubState"] == "running", state
    assert node_health(node.port) == 200
    # It runs as the unprivileged service user, the production `vllm serve` path.
    main_pid = state["MainPID"]
    user = node.node.exec("ps", "-o", "user=", "-p", main_pid).stdout.strip()
    assert user == "vllm"
    cmdline = node.node.exec("ps", "-o", "args=", "-p", main_pid).stdout
    assert "/opt/vllm/venv/bin/vllm serve /opt/models/tiny-llama" in cmdline
    assert "--config /run/credentials/vllm.service/vllm-api-keys.yaml" in cmdline


def test_key_file_is_root_only_on_tmpfs(node: BootedNode) -> None:
    key_file = "/run/vllm-fleet/api-keys.yaml"
    st = node.node.path(key_file).stat()
    assert (st.st_mode & 0o777, st.st_uid, st.st_gid) == (0o600, 0, 0)
    fs_type = node.node.exec("stat", "-f", "-c", "%T", key_file).stdout.strip()
    assert fs_type == "tmpfs"
    # The service user cannot read the file itself, only its credential copy.
    denied = node.node.exec("setpriv", "--reuid=vllm", "--regid=vllm", "--clear-groups", "cat", key_file, check=False)
    assert denied.returncode != 0 and "Permission denied" in denied.stderr


def test_key_is_in_no_argv_environment_journal_or_file(node: BootedNode) -> None:
    key = node.api_key.encode()
    processes = node.node.pids()
    assert len(processes) >= 5  # systemd, journald, dbus, vLLM's API server and engine core
    for pid in processes:
        for name in ("cmdline", "environ"):
            try:
                data = Path(f"/proc/{pid}/{name}").read_bytes()
            except OSError:
                continue  # exited meanwhile
            assert key not in data, f"API key in /proc/{pid}/{name}: {data[:200]!r}"
    journal = node.node.exec("journalctl", "--no-pager", "-o", "export", timeout=120).stdout
    assert "vllm-fleet-fetch-key" in journal and "Started" in journal  # the journal has the boot
    assert node.api_key not in journal
    assert node.api_key not in node.node.console_log.read_text(errors="replace")

    # Files: the key is only where the design puts it (the fetched file, the credential copy).
    holders = []
    root = node.node.path("/")
    for top in ("etc", "var", "run", "opt/models", "root", "tmp"):
        for path in (root / top).rglob("*"):
            try:
                if path.is_file() and not path.is_symlink() and key in path.read_bytes():
                    holders.append("/" + str(path.relative_to(root)))
            except OSError:
                continue
    assert sorted(holders) == [
        "/run/credentials/vllm.service/vllm-api-keys.yaml",
        "/run/vllm-fleet/api-keys.yaml",
    ]
    # cloud-init's own copy of the user-data was among the files scanned (instance/ is an
    # absolute symlink, which would resolve on the host through /proc/PID/root).
    assert (root / "var/lib/cloud/instances/i-node-a/user-data.txt").is_file()


def test_chat_completion_needs_the_key_and_works_with_it(node: BootedNode) -> None:
    reply = node.client.chat.completions.create(
        model=node.served_model_name,
        messages=[{"role": "user", "content": "Hello! How are you today?"}],
        max_tokens=8,
    )
    assert reply.choices[0].message.content
    assert reply.usage is not None and reply.usage.completion_tokens > 0
    nokey = openai.OpenAI(base_url=f"http://127.0.0.1:{node.port}/v1", api_key="wrong-key-0123456789")
    with pytest.raises(openai.AuthenticationError):
        nokey.models.list()


def test_sigkill_of_vllm_is_restarted_by_systemd(node: BootedNode) -> None:
    before = node.unit_state()
    assert before["ActiveState"] == "active"
    killed_at = time.monotonic()
    node.node.exec("kill", "-9", before["MainPID"])
    node.node.wait_for(lambda: node_health(node.port) != 200, 30, "vLLM to go down after SIGKILL")
    node.node.wait_for(lambda: node.unit_state()["ActiveState"] != "active", 30, "systemd to see the crash")
    reaped = reap_leftovers(node.node)
    node.wait_healthy()
    crash_to_healthy = time.monotonic() - killed_at
    TIMINGS["crash (SIGKILL) to healthy"] = crash_to_healthy
    after = node.unit_state()
    assert after["ActiveState"] == "active" and after["MainPID"] != before["MainPID"]
    assert int(after["NRestarts"]) == int(before["NRestarts"]) + 1
    restart_sec = float(node.node.show(UNIT, "RestartUSec")["RestartUSec"].rstrip("s"))
    assert crash_to_healthy > restart_sec  # systemd waited RestartSec, then started it again
    journal = node.node.journal("-u", UNIT, "-o", "cat")
    assert "Main process exited, code=killed, status=9/KILL" in journal
    # The first request: a bare 3-token prompt, which killed the CPU worker with SIGILL while the
    # warm-up pass was skipped (CPU_WARMUP_FLAGS).
    reply = node.client.completions.create(model=node.served_model_name, prompt="One two", max_tokens=4)
    assert reply.choices and reply.usage is not None and reply.usage.completion_tokens > 0, reply
    assert node.unit_state()["NRestarts"] == after["NRestarts"]  # the request did not crash it
    print(f"SIGKILL to /health 200 again: {crash_to_healthy:.1f} s (RestartSec={restart_sec:g}; "
          f"{reaped} leftover processes killed for systemd, see CGROUP_KILL_FAILED); first request after: "
          f"served, {reply.usage.completion_tokens} tokens")


def test_stop_with_a_stream_in_flight_lets_the_stream_finish(node: BootedNode) -> None:
    """`systemctl stop` (what the drain hook does) while a completion streams: vLLM's
    --shutdown-timeout drain finishes the stream instead of cutting it."""
    import threading

    node.wait_healthy()
    argv = list(node.spec.replicas[0].serve_argv)
    shutdown_s = int(argv[argv.index("--shutdown-timeout") + 1])
    first_token = threading.Event()
    result: dict[str, object] = {}

    def stream() -> None:
        try:
            chunks = node.client.completions.create(
                model=node.served_model_name, prompt="Count:", max_tokens=1900, stream=True,
                extra_body={"ignore_eos": True},
            )
            tokens, finish = 0, None
            for chunk in chunks:
                tokens += 1
                first_token.set()
                finish = chunk.choices[0].finish_reason or finish
            result.update(tokens=tokens, finish=finish)
        except (openai.APIError, OSError) as error:  # recorded and asserted below
            result["error"] = repr(error)
            first_token.set()

    thread = threading.Thread(target=stream)
    thread.start()
    assert first_token.wait(120), "the stream never started"
    stop_at = time.monotonic()
    node.node.exec("systemctl", "stop", UNIT)
    stopped_after = time.monotonic() - stop_at
    thread.join(timeout=shutdown_s + 60)
    TIMINGS["stop with a stream in flight"] = stopped_after
    print(f"systemctl stop with a stream in flight: {stopped_after:.1f} s (--shutdown-timeout {shutdown_s}); "
          f"stream: {result}")
    assert "error" not in result, result
    assert result["finish"] == "length", result  # every requested token arrived: nothing was cut
    assert stopped_after <= shutdown_s + 30
    # Leave the node serving for whatever runs next.
    node.node.exec("systemctl", "start", UNIT)
    node.wait_healthy()


def test_repeated_crashes_stop_at_the_start_rate_limit(node: BootedNode) -> None:
    """A crash loop ends: after StartLimitBurst starts within StartLimitIntervalSec systemd
    refuses another, the unit stays failed and /health stays down (the load balancer's check
    then fails and the Auto Scaling group replaces the instance)."""
    limits = node.node.show(UNIT, "StartLimitBurst", "StartLimitIntervalUSec", "RestartUSec")
    burst = int(limits["StartLimitBurst"])
    # Count from zero: earlier tests' starts (boot, SIGKILL restart, stop/start) count too.
    node.node.exec("systemctl", "reset-failed", UNIT)
    started_at = time.monotonic()
    kills = 0
    last_pid = ""

    def started_again_or_failed(previous_pid: str) -> bool:
        state = node.unit_state()
        return state["ActiveState"] == "failed" or (
            state["ActiveState"] == "active" and state["MainPID"] not in ("0", previous_pid))

    while True:
        # Each start: wait until systemd has exec'd a new main process, then SIGKILL it.
        node.node.wait_for(functools.partial(started_again_or_failed, last_pid), 120,
                           f"start {kills + 1} of {UNIT} (or the start limit)")  # fmt: skip
        state = node.unit_state()
        if state["ActiveState"] == "failed":
            break
        last_pid = state["MainPID"]
        node.node.exec("kill", "-9", last_pid, check=False)
        kills += 1
        reap_leftovers(node.node)
        assert kills <= burst + 1, f"{UNIT} kept restarting past StartLimitBurst={burst}"
    loop_s = time.monotonic() - started_at
    failed = node.node.show(UNIT, "ActiveState", "Result", "NRestarts")
    journal = node.node.journal("-u", UNIT, "-o", "cat")
    print("vllm.service journal, end of the loop:\n" + "\n".join(journal.splitlines()[-8:]))
    assert failed["ActiveState"] == "failed", failed
    assert "Start request repeated too quickly." in journal
    # The start that had run when the counter was reset plus `burst` restarts: `burst` kills
    # of restarted processes and one of the first, then the refused start.
    assert kills == burst + 1, (kills, burst, failed)
    # It stays down: no start for well over RestartSec.
    restart_s = float(limits["RestartUSec"].rstrip("s"))
    time.sleep(restart_s * 2)
    assert node.unit_state()["ActiveState"] == "failed"
    assert node_health(node.port) is None
    TIMINGS["crash loop to start-limit-hit"] = loop_s
    print(f"crash loop: {kills} SIGKILLs, then start-limit-hit after {loop_s:.1f} s "
          f"(StartLimitBurst={burst}, StartLimitInterval={limits['StartLimitIntervalUSec']}, RestartSec={restart_s:g})")
    # An operator's way back (or a new instance): reset-failed, start.
    node.node.exec("systemctl", "reset-failed", UNIT)
    node.node.exec("systemctl", "start", UNIT)
    node.wait_healthy()


def test_secrets_manager_down_at_boot_fails_clearly_and_recovers(
    node_rootfs: Path, tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Boot with the Secrets Manager endpoint down: the fetch says clearly what is missing,
    vLLM's start waits behind it (no key, no vLLM, no crash loop), and once the endpoint is
    back the next attempt succeeds and vLLM serves, with no one touching the node."""
    production = production_spec()
    down = MotoServer(free_port(), tmp_path_factory.mktemp("moto-down") / "moto.log")  # not started
    booted = boot(node_rootfs, tmp_path_factory.mktemp("node-b"), tiny_llama_dir, down, "node-b",
                  fetch_warn_after=2)  # fmt: skip
    try:
        booted.node.wait_for(
            lambda: "NO API KEY YET" in booted.node.journal("-u", FETCH_UNIT, "-o", "cat"),
            180, "the key fetch to report the missing key")
        failed_at = time.monotonic()
        journal = booted.node.journal("-u", FETCH_UNIT, "-o", "cat")
        giving_up = next(line for line in journal.splitlines() if "NO API KEY YET" in line)
        assert production.api_key_secret_id in giving_up and "vLLM starts once it is" in giving_up
        assert "Could not connect to the endpoint URL" in journal  # the AWS CLI's own reason
        assert booted.node.show(FETCH_UNIT, "ActiveState")["ActiveState"] == "activating"
        # vLLM is not started without the key, and its start job is still queued (not failed).
        vllm_state = booted.unit_state()
        assert vllm_state["ActiveState"] in ("inactive", "activating") and vllm_state["MainPID"] == "0", vllm_state
        jobs = booted.node.exec("systemctl", "list-jobs", "--no-legend").stdout
        assert UNIT in jobs, jobs
        assert not booted.node.path("/run/vllm-fleet/api-keys.yaml").exists()

        down.start()  # the same port: the endpoint the node was given comes up
        down.put_secret(production.api_key_secret_id, booted.api_key, production.region)
        back_at = time.monotonic()
        booted.wait_healthy()
        recovered_s = time.monotonic() - back_at
        TIMINGS["Secrets Manager back to healthy"] = recovered_s
        fetch = booted.node.show(FETCH_UNIT, "ActiveState", "Result")
        assert fetch == {"ActiveState": "active", "Result": "success"}, fetch
        assert "wrote /run/vllm-fleet/api-keys.yaml" in booted.node.journal("-u", FETCH_UNIT, "-o", "cat")
        reply = booted.client.chat.completions.create(
            model=booted.served_model_name, messages=[{"role": "user", "content": "Hello! How are you today?"}],
            max_tokens=8,
        )
        assert reply.choices[0].message.content
        print(f"Secrets Manager down at boot: the fetch said {giving_up.strip()!r}; endpoint back "
              f"{back_at - failed_at:.1f} s later; /health 200 {recovered_s:.1f} s after that")
    except Exception:
        print(booted.failure_context() if booted.node.alive else booted.node.console_tail())
        raise
    finally:
        stop_node(booted.node)
        down.stop()


def test_print_timings() -> None:
    """Phase timings of this module (run last; pytest -s shows them)."""
    print("\nnode boot timings:")
    for name, seconds in TIMINGS.items():
        print(f"  {name}: {seconds:.1f} s")
    assert "boot to healthy" in TIMINGS
