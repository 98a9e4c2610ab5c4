"""What the demo's end-to-end tests share: a work directory whose model cache is the session's."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import test_cache_dir


@pytest.fixture
def demo_workdir(tmp_path: Path) -> Path:
    """A fresh work directory for `distillery run`, except its model cache (``.cache/models``): a link to
    the suite's ($DISTILLERY_TEST_CACHE/models, where the ``smollm2_dir`` fixture converts too), so the
    SmolLM2 GGUF is converted (~21 s on 2 cores) and the student pruned (~5 s) once for the suite and not
    again in every demo test. The runs still resolve their models through ``materialize``, which finds them
    converted; the conversion is the ``smollm2_dir`` fixture's work and pruning ``tests/trainer``'s. The
    rest of ``.cache`` (the teacher-answer cache) stays the test's own."""
    workdir = tmp_path / "runs"
    cache = workdir / ".cache"
    cache.mkdir(parents=True)
    (cache / "models").symlink_to(test_cache_dir() / "models", target_is_directory=True)
    return workdir
