"""The ``train`` subcommand's registration is light (no torch) and its errors are exit codes with messages."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def _trainer(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "distillery_trainer.cli", *args], capture_output=True, text=True, timeout=120
    )


def test_help_is_instant_and_imports_no_torch() -> None:
    code = (
        "import sys; from distillery_trainer.cli import build_parser; "
        "build_parser().parse_args(['train', '--config', 'x']); print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
    helped = _trainer("train", "--help")
    assert helped.returncode == 0 and "--config" in helped.stdout and "torchrun" in helped.stdout


def test_a_bad_config_exits_2_with_the_field(tmp_path: Path) -> None:
    bad = tmp_path / "stage.yaml"
    bad.write_text("run: {name: x}\nartifacts: /tmp/x\nspec: {student: {model: m}, training: {method: kd}}\n")
    out = _trainer("train", "--config", str(bad))
    assert out.returncode == 2
    assert "spec.teacher" in out.stderr
    missing = _trainer("train", "--config", str(tmp_path / "nope.yaml"))
    assert missing.returncode == 2 and "nope.yaml" in missing.stderr
