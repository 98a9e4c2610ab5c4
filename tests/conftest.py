"""Shared fixtures. Layout: unit/ (pure logic, fast), operator/, trainer/, e2e/ (real processes, slow)."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"

# The Kubernetes API emulator and the operator process: `cluster`, `start_operator`, `api_audit`.
from tests.kube.fixtures import api_audit, cluster, start_operator  # noqa: E402, F401
