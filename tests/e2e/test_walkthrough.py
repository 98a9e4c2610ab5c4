"""The README's walkthrough (`examples/walkthrough.py`) runs as documented: the emulator, the real
operator, the controllers played as the operator's tests play them, and the verdict at the end."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import EXAMPLES, REPO

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    ("retention", "verdict"), [("0.91", "QualityGatePassed"), ("0.85", "QualityGateFailed")]
)
def test_the_walkthrough_ends_in_the_verdict(retention: str, verdict: str) -> None:
    out = subprocess.run(
        [
            sys.executable,
            str(EXAMPLES / "walkthrough.py"),
            str(EXAMPLES / "run.yaml"),
            "--retention",
            retention,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert verdict in out.stdout and "== Events" in out.stdout
    # the README's case, said plainly: one always-on GPU against the teacher API at 270k requests a month
    assert (
        "At 270,000 requests a month (cost.requestsPerMonth) the teacher API is cheaper: $1,089 a month "
        "against $1,460 for the student" in out.stdout
    )
    assert "The student is cheaper above 362,080 requests a month." in out.stdout
