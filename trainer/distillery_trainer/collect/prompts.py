"""Prompts in: where they come from, a stable id for each, the train/eval split, and the shard's slice.

Sources (``spec.data.prompts``), all read as rows of ``{"id"?, "messages" | "prompt", "reference"?,
"category"?}``:

- ``pvcPath`` — JSONL on the run's volume, relative to the volume's root (``--prompts`` overrides it;
  for ``distillery run`` the local executor resolves it against the run file with :func:`local_prompts_path`);
- ``configMapRef`` — the ConfigMap key the operator mounts into the collection pods, read in the directory
  ``$DISTILLERY_PROMPTS_DIR`` names (:data:`CONFIGMAP_MOUNT` by default) as the file named by the key
  (`distillery run` refuses it: there is no ConfigMap on one machine);
- ``url`` — http(s) and file URLs by a plain download, s3/gs through fsspec;
- ``hfDataset`` — a dataset saved with ``save_to_disk`` (a directory) or a dataset name ``datasets`` can load
  (offline from its cache when ``HF_DATASETS_OFFLINE=1``).

A row without an id gets the hash of its messages, so the same prompt has the same id in every run; the
split and the shard slice are pure functions of the ids and the input order, so every attempt of a shard
sees the same prompts.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..api.spec import HFDataset, PromptSource
from ..models import VOLUME_ROOT_ENV

# Where the collection pods see a data.prompts.configMapRef: beside the stage config's mount, not inside
# it (a mount point cannot be made inside a read-only ConfigMap volume).
CONFIGMAP_MOUNT = "/etc/distillery-prompts"
PROMPTS_DIR_ENV = "DISTILLERY_PROMPTS_DIR"
ROLES = ("system", "user", "assistant", "tool", "developer")


class PromptError(ValueError):
    """A prompt file or row that cannot be used; the message names the place and the fix."""


@dataclass(frozen=True)
class Prompt:
    id: str
    messages: list[dict[str, Any]]  # as sent to the teacher: the system prompt applied
    split: str  # "train" | "eval"
    reference: str | None = None
    category: str | None = None


# ---------------------------------------------------------------------------------------------- ids, split, shards


def canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def content_id(messages: list[dict[str, Any]]) -> str:
    """The id of a prompt given without one: a hash of its messages (16 hex digits)."""
    return hashlib.sha256(canonical(messages).encode()).hexdigest()[:16]


def split_of(prompt_id: str, eval_fraction: float) -> str:
    """``eval`` for a deterministic ``eval_fraction`` of ids (by hash), else ``train``."""
    h = int.from_bytes(hashlib.sha256(b"split:" + prompt_id.encode()).digest()[:8], "big")
    return "eval" if h / 2**64 < eval_fraction else "train"


def shard_slice(items: Sequence[Any], shard: int, shards: int) -> list[Any]:
    """Round-robin by position: shard sizes differ by at most one, and the union over shards is the input."""
    if shards < 1 or not 0 <= shard < shards:
        raise ValueError(
            f"shard {shard} is not in [0, {shards}): check --shard/--shards or JOB_COMPLETION_INDEX"
        )
    return list(items[shard::shards])


def shard_from_env(default: int = 0) -> int:
    raw = os.environ.get("JOB_COMPLETION_INDEX")
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"JOB_COMPLETION_INDEX={raw!r} is not an integer") from None


# ---------------------------------------------------------------------------------------------- rows → prompts


def to_messages(
    row: dict[str, Any], where: str, messages_field: str = "messages", prompt_field: str = "prompt"
) -> list[dict[str, Any]]:
    if row.get(messages_field) is not None:
        messages = row[messages_field]
        if not isinstance(messages, list) or not messages:
            raise PromptError(f"{where}: {messages_field!r} must be a non-empty list of {{role, content}}")
        out = []
        for i, m in enumerate(messages):
            if (
                not isinstance(m, dict)
                or m.get("role") not in ROLES
                or not isinstance(m.get("content"), (str, list))
            ):
                raise PromptError(
                    f'{where}: {messages_field}[{i}] must be {{"role": one of {", ".join(ROLES)}, "content": str}}'
                )
            out.append({"role": m["role"], "content": m["content"]})
        return out
    prompt = row.get(prompt_field)
    if isinstance(prompt, str) and prompt.strip():
        return [{"role": "user", "content": prompt}]
    raise PromptError(
        f"{where}: needs {messages_field!r} (a list of {{role, content}}) or {prompt_field!r} (a string)"
    )


def with_system_prompt(messages: list[dict[str, Any]], system_prompt: str | None) -> list[dict[str, Any]]:
    """``data.systemPrompt`` first, unless the prompt brings its own system message (the more specific one)."""
    if not system_prompt or (messages and messages[0]["role"] in ("system", "developer")):
        return messages
    return [{"role": "system", "content": system_prompt}, *messages]


def prepare(
    rows: Iterator[tuple[str, dict[str, Any]]],
    *,
    eval_fraction: float,
    system_prompt: str | None = None,
    max_prompts: int | None = None,
    messages_field: str = "messages",
    prompt_field: str = "prompt",
) -> list[Prompt]:
    """Rows (with where they came from, for errors) → prompts with ids and split; exact repeats dropped,
    an id reused for different content rejected."""
    seen: dict[str, tuple[str, str]] = {}
    out: list[Prompt] = []
    for where, row in rows:
        if max_prompts is not None and len(out) >= max_prompts:
            break
        if not isinstance(row, dict):
            raise PromptError(f"{where}: expected a JSON object, got {type(row).__name__}")
        messages = to_messages(row, where, messages_field, prompt_field)
        given = row.get("id")
        pid = str(given) if given is not None and str(given) != "" else content_id(messages)
        fingerprint = canonical(messages)
        if pid in seen:
            first, first_fp = seen[pid]
            if first_fp != fingerprint:
                raise PromptError(f"{where}: id {pid!r} was already used for a different prompt at {first}")
            continue
        seen[pid] = (where, fingerprint)
        ref = row.get("reference")
        cat = row.get("category")
        out.append(
            Prompt(
                id=pid,
                messages=with_system_prompt(messages, system_prompt),
                split=split_of(pid, eval_fraction),
                reference=None if ref is None else str(ref),
                category=None if cat is None else str(cat),
            )
        )
    return out


# ---------------------------------------------------------------------------------------------- reading sources


def read_jsonl(path: str | Path) -> Iterator[tuple[str, dict[str, Any]]]:
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                yield f"{path}:{n}", json.loads(line)
            except json.JSONDecodeError as exc:
                raise PromptError(
                    f"{path}:{n}: not JSON ({exc.msg}); the file must hold one JSON object a line"
                ) from None


def read_hf_dataset(ds: HFDataset) -> Iterator[tuple[str, dict[str, Any]]]:
    import datasets  # type: ignore[import-untyped]

    if Path(ds.name).is_dir():
        loaded = datasets.load_from_disk(ds.name)
        if isinstance(loaded, datasets.DatasetDict):
            if ds.split not in loaded:
                raise PromptError(
                    f"{ds.name}: no split {ds.split!r} (has {', '.join(loaded)}): set hfDataset.split"
                )
            loaded = loaded[ds.split]
    else:
        loaded = datasets.load_dataset(ds.name, ds.config, split=ds.split)
    for i, row in enumerate(loaded):
        yield f"{ds.name}[{ds.split}][{i}]", dict(row)


def download(url: str, dest_dir: str | Path) -> Path:
    """A plain download (http, https, file; s3/gs/... through fsspec) into ``dest_dir``, atomically."""
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / f"prompts-{hashlib.sha256(url.encode()).hexdigest()[:12]}.jsonl"
    fd, tmp = tempfile.mkstemp(prefix=".download.", dir=dest_dir)
    try:
        with os.fdopen(fd, "wb") as out:
            if url.split("://", 1)[0] in ("http", "https", "file"):
                with urllib.request.urlopen(url, timeout=120) as resp:  # noqa: S310 (the spec allows these schemes)
                    while block := resp.read(1 << 20):
                        out.write(block)
            else:
                try:
                    import fsspec  # type: ignore[import-untyped]
                except ImportError:
                    raise PromptError(
                        f"{url}: reading this scheme needs fsspec and its plugin (e.g. s3fs)"
                    ) from None
                with fsspec.open(url, "rb") as src:
                    while block := src.read(1 << 20):
                        out.write(block)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return dest


def volume_root(artifacts: str, namespace: str, name: str) -> Path:
    """The volume's root in a pod: ``$DISTILLERY_VOLUME_ROOT``, else ``artifacts`` minus its
    ``runs/<namespace>/<name>`` tail (the layout the operator mounts), else ``artifacts`` itself."""
    env = os.environ.get(VOLUME_ROOT_ENV)
    if env:
        return Path(env)
    path = Path(artifacts)
    tail = ("runs", namespace, name)
    if path.parts[-3:] == tail:
        return Path(*path.parts[:-3]) if len(path.parts) > 3 else Path("/")
    return path


def local_prompts_path(source: PromptSource, base_dir: str | Path) -> Path | None:
    """For ``distillery run``: the local file a ``pvcPath`` or ``file://`` url names, relative to
    ``base_dir`` (the run file's directory); None for sources that are not local files."""
    if source.pvc_path is not None:
        p = Path(source.pvc_path)
        return p if p.is_absolute() else (Path(base_dir) / p).resolve()
    if source.url is not None and source.url.startswith("file://"):
        return Path(source.url[len("file://") :])
    return None


def iter_source(
    source: PromptSource, *, volume: Path, download_dir: Path, override: str | Path | None = None
) -> Iterator[tuple[str, dict[str, Any]]]:
    """Rows of the spec's prompt source (or of ``override``: a JSONL file or a saved dataset directory)."""
    if override is not None:
        p = Path(override)
        if p.is_dir():
            hf = source.hf_dataset or HFDataset(name=str(p))
            yield from read_hf_dataset(hf.model_copy(update={"name": str(p)}))
            return
        yield from read_jsonl(_existing(p, "--prompts"))
        return
    if source.hf_dataset is not None:
        yield from read_hf_dataset(source.hf_dataset)
    elif source.pvc_path is not None:
        p = Path(source.pvc_path)
        yield from read_jsonl(_existing(p if p.is_absolute() else volume / p, "spec.data.prompts.pvcPath"))
    elif source.config_map_ref is not None:
        ref = source.config_map_ref
        p = Path(os.environ.get(PROMPTS_DIR_ENV) or CONFIGMAP_MOUNT) / ref.key
        where = (
            f"spec.data.prompts.configMapRef (ConfigMap {ref.name}, key {ref.key}, mounted by the operator)"
        )
        yield from read_jsonl(_existing(p, where))
    elif source.url is not None:
        yield from read_jsonl(download(source.url, download_dir))
    else:  # pragma: no cover - the model requires exactly one source
        raise PromptError("spec.data.prompts: set one of configMapRef, pvcPath, url, hfDataset")


def _existing(path: Path, field: str) -> Path:
    if not path.is_file():
        raise PromptError(f"{field}: no such file {path} (pass --prompts FILE to read another)")
    return path
