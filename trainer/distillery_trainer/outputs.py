"""Stage outputs that know their inputs.

Each stage records the digest of its inputs (:func:`distillery_trainer.api.stages.fingerprints`) next to
its outputs, in ``<stage dir>/inputs.json``. A stage that starts with the inputs on record resumes what
is there (kill -9 resume, the teacher cache); one that starts with other inputs first sets the old
outputs aside under ``superseded/<stage>-<digest>-<token>/`` (``collect/``, or ``train/`` and
``student/``, or ``eval/`` inside) and says so in its log, so a restarted
stage never reuses a student trained for another ``training`` section, a shard of an 8-shard collection
after a change to 4, or another teacher's answers. The most recent set-aside outputs of each stage are
kept (:data:`KEEP_SUPERSEDED`); older ones are removed.

The stage pods do this themselves, so the operator needs no access to the volume, and several pods may
do it at once (the shards of a collection): the old directory is claimed by renaming it to a name made
of the record it carried, which only one process can do, and a fresh directory appears with its record
already inside (a renamed temporary directory), so no process ever sees one without the other.

Outputs that carry no record, or a record of an older fingerprint scheme, were written by an older
version of Distillery: they are adopted as they are (see :data:`~distillery_trainer.api.stages.SCHEME`).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .api.spec import DistillationRunSpec
from .api.stages import fingerprints, inputs_changed
from .layout import RunLayout, atomic_write_json

INPUTS_FILE = "inputs.json"
KEEP_SUPERSEDED = 1
ADOPTED = "adopted"
_ATTEMPTS = 50


class StaleInputs(RuntimeError):
    """A stage found the outputs of an earlier stage made for other inputs than its own."""


@dataclass(frozen=True)
class Record:
    inputs: str
    token: str


def stage_dirs(layout: RunLayout, stage: str) -> tuple[Path, ...]:
    """The directories a stage writes; the first holds its record."""
    return {
        "collect": (layout.collect_dir,),
        "train": (layout.train_dir, layout.student_dir),
        "evaluate": (layout.eval_dir,),
    }[stage]


def record_file(layout: RunLayout, stage: str) -> Path:
    return stage_dirs(layout, stage)[0] / INPUTS_FILE


def recorded(layout: RunLayout, stage: str) -> Record | None:
    try:
        data = json.loads(record_file(layout, stage).read_text(encoding="utf-8"))
        return Record(str(data["inputs"]), str(data.get("token", "")))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def matches(layout: RunLayout, stage: str, spec: DistillationRunSpec) -> bool:
    """Whether the stage's outputs on disk (if any) were made for this spec's inputs (or are adopted)."""
    rec = recorded(layout, stage)
    return not inputs_changed(rec.inputs if rec else None, fingerprints(spec)[stage])


def require(layout: RunLayout, stage: str, spec: DistillationRunSpec, *, by: str) -> None:
    """Stage ``by`` reads ``stage``'s outputs: refuse ones made for other inputs than this spec's."""
    rec = recorded(layout, stage)
    current = fingerprints(spec)[stage]
    if rec is not None and inputs_changed(rec.inputs, current):
        raise StaleInputs(
            f"{by}: {stage_dirs(layout, stage)[0]} holds the {stage} stage's outputs for other inputs "
            f"({rec.inputs}; this run's are {current}): the {stage} stage must run again first"
        )


def _has_content(path: Path) -> bool:
    try:
        return any(path.iterdir())
    except OSError:
        return False


def _install(layout: RunLayout, stage: str, current: str) -> bool:
    """Create the stage's first directory with its record inside; False if another process won."""
    primary = stage_dirs(layout, stage)[0]
    primary.parent.mkdir(parents=True, exist_ok=True)
    tmp = primary.parent / f".{primary.name}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.mkdir()
    atomic_write_json(tmp / INPUTS_FILE, {"inputs": current, "token": uuid.uuid4().hex[:12]})
    try:
        os.rename(tmp, primary)  # replaces an empty directory; fails on one with content
        return True
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        return False


def _prune(layout: RunLayout, stage: str, log: Callable[[str], None]) -> None:
    root = layout.root / "superseded"
    sets = sorted(root.glob(f"{stage}-*"), key=lambda p: p.stat().st_mtime if p.exists() else 0.0)
    for old in sets[:-KEEP_SUPERSEDED]:
        shutil.rmtree(old, ignore_errors=True)
        log(f"removed older set-aside outputs {old}")


def claim(
    layout: RunLayout, stage: str, spec: DistillationRunSpec, log: Callable[[str], None]
) -> Path | None:
    """Make ``stage``'s directories hold outputs for this spec's inputs before the stage writes: keep
    what matches (resume), set aside what does not. Returns where old outputs were set aside, if any."""
    current = fingerprints(spec)[stage]
    dirs = stage_dirs(layout, stage)
    primary = dirs[0]
    for _ in range(_ATTEMPTS):
        rec = recorded(layout, stage)
        if rec is None:
            if not any(_has_content(d) for d in dirs):
                if _install(layout, stage, current):
                    return None
                continue
            if not (primary / INPUTS_FILE).exists():
                # Written before inputs were recorded: adopt (every process writes the same record).
                primary.mkdir(parents=True, exist_ok=True)
                atomic_write_json(primary / INPUTS_FILE, {"inputs": current, "token": ADOPTED})
                log(f"{stage}: adopted outputs written before inputs were recorded ({primary})")
                return None
            continue  # a record being replaced: read again
        if not inputs_changed(rec.inputs, current):
            return None
        target = layout.root / "superseded" / f"{stage}-{rec.inputs}-{rec.token}"
        target.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(primary, target / primary.name)  # the claim: one process moves the generation it read
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.ENOTEMPTY, errno.EEXIST):
                raise
            continue  # another process set it aside first (the target exists): read again
        os.utime(target)  # the newest set-aside outputs: what _prune keeps
        for other in dirs[1:]:
            if other.exists():
                os.rename(other, target / other.name)
        log(
            f"{stage}: the outputs on disk were made for other inputs ({rec.inputs}, this run's are "
            f"{current}): set aside in {target}; starting this stage afresh"
        )
        _prune(layout, stage, log)
        _install(layout, stage, current)
        return target
    raise RuntimeError(f"{stage}: could not settle {primary} after {_ATTEMPTS} attempts (another process?)")
