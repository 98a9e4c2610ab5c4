"""Air-gapped clusters: a model already on the run's volume, named ``pvc://<path>`` (relative to the
volume's root, as ``data.prompts.pvcPath`` is), loads with no hub access (``HF_HUB_OFFLINE=1``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from distillery_trainer.models import ModelNotFound, materialize, resolve_model_ref

from tests.support import tiny


def test_a_pvc_ref_is_a_path_on_the_volume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DISTILLERY_VOLUME_ROOT", raising=False)
    # The pods' volume root: DISTILLERY_VOLUME_ROOT, which the operator sets where it mounts the volume.
    assert resolve_model_ref("pvc://models/m", volume="/data") == "/data/models/m"
    monkeypatch.setenv("DISTILLERY_VOLUME_ROOT", "/mnt/vol")
    assert resolve_model_ref("pvc://models/m") == "/mnt/vol/models/m"
    assert resolve_model_ref("pvc:///models/m") == "/mnt/vol/models/m"
    with pytest.raises(ModelNotFound, match=r"\.\."):
        resolve_model_ref("pvc://../etc/m")
    monkeypatch.delenv("DISTILLERY_VOLUME_ROOT")
    # `distillery run`: the run file's directory stands for the volume, as for pvcPath prompts.
    assert resolve_model_ref("pvc://models/m", base_dir=tmp_path) == str(tmp_path / "models" / "m")
    with pytest.raises(ModelNotFound, match="volume"):
        resolve_model_ref("pvc://models/m")


@pytest.mark.slow
def test_a_model_on_the_volume_loads_offline(tmp_path: Path) -> None:
    volume = tmp_path / "volume"
    model_dir = volume / "models" / "tiny-student"
    tiny.make_llama(model_dir, tiny.make_tokenizer(model_dir))
    code = (
        "import sys\n"
        "from transformers import AutoModelForCausalLM\n"
        "from distillery_trainer.models import materialize\n"
        "from distillery_trainer.collect.identity import load_tokenizer\n"
        "path = materialize('pvc://models/tiny-student', sys.argv[1])\n"
        "model = AutoModelForCausalLM.from_pretrained(path)\n"
        "tok = load_tokenizer('pvc://models/tiny-student')\n"
        "print(path, model.config.num_hidden_layers, len(tok))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    env.update(
        {"HF_HUB_OFFLINE": "1", "DISTILLERY_VOLUME_ROOT": str(volume), "HF_HOME": str(tmp_path / "hf")}
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "cache")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    path, layers, vocab = out.stdout.split()
    assert path == str(model_dir) and layers == "1" and int(vocab) > 256


def test_materialize_prunes_a_model_on_the_volume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISTILLERY_VOLUME_ROOT", str(tmp_path / "vol"))
    model_dir = tmp_path / "vol" / "m"
    tiny.make_llama(model_dir, tiny.make_tokenizer(model_dir), layers=2)
    pruned = materialize("pvc://m", tmp_path / "cache", prune=1)
    assert Path(pruned).parent == tmp_path / "cache" and (Path(pruned) / "config.json").exists()


def test_a_model_cache_that_is_a_link_to_a_folder_not_made_yet_is_made(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A work directory whose ``.cache/models`` links to a shared cache not created yet (the demo's tests
    do this on a fresh machine): the cache is made where the link points. ``mkdir(exist_ok=True)`` on the
    link itself raised FileExistsError, and the run died in its collection."""
    monkeypatch.setenv("DISTILLERY_VOLUME_ROOT", str(tmp_path / "vol"))
    model_dir = tmp_path / "vol" / "m"
    tiny.make_llama(model_dir, tiny.make_tokenizer(model_dir), layers=2)
    cache = tmp_path / "work" / ".cache" / "models"
    cache.parent.mkdir(parents=True)
    cache.symlink_to(tmp_path / "shared" / "models", target_is_directory=True)
    pruned = materialize("pvc://m", cache, prune=1)
    assert (tmp_path / "shared" / "models" / Path(pruned).name / "config.json").exists()
