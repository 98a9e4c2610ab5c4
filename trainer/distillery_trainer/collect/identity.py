"""Which tokenizer the teacher's token ids belong to, so training can check the student shares it.

Tried in order: ``--tokenizer``; the ``root`` vLLM reports for the served model in ``GET /models`` (the
directory it loaded, when it is readable here — the local executor's case); the self-hosted teacher's
model reference; the endpoint's model name when it looks like a Hugging Face id. When none loads (an API
teacher), the served model name is recorded with ``loaded: false`` and a note saying so.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from ..data.topk import tokenizer_identity, unloaded_identity
from ..models import resolve_model_ref

log = logging.getLogger("distillery.collect")


def load_tokenizer(ref: str) -> Any:
    """A tokenizer from a directory, a ``.gguf`` file, ``pkg://``, or a hub id (from the local cache when
    ``HF_HUB_OFFLINE=1``)."""
    from transformers import AutoTokenizer

    path = Path(resolve_model_ref(ref))
    if path.suffix == ".gguf" and path.is_file():
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return AutoTokenizer.from_pretrained(str(path) if path.exists() else ref)


def candidates(
    override: str | None, served_root: str | None, self_hosted: str | None, endpoint_model: str | None
) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    if override:
        out.append(("--tokenizer", override))
    if served_root and os.path.exists(served_root):
        out.append(("the served model's root", served_root))
    if self_hosted:
        out.append(("teacher.selfHosted.model", self_hosted))
    if endpoint_model and "/" in endpoint_model:
        out.append(("teacher.endpoint.model", endpoint_model))
    return out


def resolve(tried: list[tuple[str, str]], served_model: str) -> tuple[Any | None, dict[str, Any]]:
    """The first tokenizer that loads and its identity; else None and the served model's name."""
    errors = []
    for source, ref in tried:
        try:
            tokenizer = load_tokenizer(ref)
        except Exception as exc:  # noqa: BLE001 - any failure means "try the next one"
            errors.append(f"{source} {ref!r}: {type(exc).__name__}")
            continue
        identity = tokenizer_identity(tokenizer, ref)
        identity["source"] = source
        identity["served_model"] = served_model
        return tokenizer, identity
    note = (
        "the teacher's tokenizer could not be loaded where collection ran"
        + (f" (tried {'; '.join(errors)})" if errors else "")
        + "; only the served model name identifies it: pass --tokenizer to record its vocabulary"
    )
    log.warning("white-box collection: %s", note)
    return None, unloaded_identity(served_model, note)
