"""Stage processes of the local executor: started in their own process group with their output in a log
file, polled so the terminal shows progress, and stopped as a group (SIGTERM, then SIGKILL) on Ctrl-C or
failure, so no trainer or vLLM process outlives ``distillery run``."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from distillery_trainer.progress_line import is_progress_line
from distillery_trainer.redact import scrub


class StageFailed(Exception):
    """A stage ended badly: which stage, why, and where its log is."""

    def __init__(self, stage: str, cause: str, log: Path | None = None) -> None:
        self.stage, self.cause, self.log = stage, cause, log
        where = f" (log: {log})" if log else ""
        super().__init__(f"stage {stage} failed: {cause}{where}")


def tail(path: Path, lines: int = 12) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.rstrip().splitlines()[-lines:])


def human_tail(path: Path, lines: int = 12) -> str:
    """The last ``lines`` lines a person should read: ``distillery-progress {json}`` lines (for the
    operator) left out, anything shaped like a key masked."""
    kept = [ln for ln in tail(path, 400).splitlines() if ln.strip() and not is_progress_line(ln)]
    return scrub("\n".join(kept[-lines:]))


def last_error_line(path: Path) -> str:
    """The most telling line of a failed process's log: its last line logged at ERROR level, else its last
    error-looking line, else its last line; anything shaped like a key masked (it goes into the status)."""
    lines = [ln.strip() for ln in tail(path, 60).splitlines() if ln.strip() and not is_progress_line(ln)]
    for words in ((" ERROR ", " CRITICAL ", "error:"), ("Error", "Exception", "failed", "FAILED")):
        for ln in reversed(lines):
            if any(word in ln for word in words):
                return scrub(ln)
    return scrub(lines[-1]) if lines else "no output"


@dataclass
class Proc:
    popen: subprocess.Popen[bytes]
    log: Path
    argv: list[str]

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, grace: float = 20.0) -> None:
        if self.popen.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(self.popen.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.popen.wait(wait)
                return
            except subprocess.TimeoutExpired:
                continue


def start(argv: Sequence[str], log: Path, env: dict[str, str] | None = None, cwd: Path | None = None) -> Proc:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as fh:
        fh.write(f"\n$ {' '.join(argv)}\n".encode())
        fh.flush()
        popen = subprocess.Popen(
            list(argv),
            stdout=fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
            cwd=cwd,
            start_new_session=True,  # its own process group: Ctrl-C reaches us, and we stop it as a group
        )
    return Proc(popen, log, list(argv))


def run(
    stage: str,
    argv: Sequence[str],
    log: Path,
    *,
    env: dict[str, str] | None = None,
    tick: Callable[[], None] | None = None,
    interval: float = 1.0,
) -> None:
    """Run a stage process to its end, calling ``tick`` every ``interval`` s; raise StageFailed on failure."""
    proc = start(argv, log, env)
    try:
        while proc.alive():
            if tick:
                tick()
            time.sleep(interval)
    except BaseException:
        proc.stop()
        raise
    if tick:
        tick()
    code = proc.popen.returncode
    if code != 0:
        raise StageFailed(stage, f"exit code {code}: {last_error_line(log)}", log)
