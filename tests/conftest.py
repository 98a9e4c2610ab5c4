"""Shared fixtures. Layout: unit/ (pure logic, fast), operator/, trainer/, e2e/ (real processes, slow)."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"
