"""The whole ``DistillationRun`` object, and reading it from YAML with every error given its field path."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator

from .base import API_GROUP, API_VERSION, KIND, ApiModel, format_errors
from .names import run_name_problem
from .spec import DistillationRunSpec
from .status import DistillationRunStatus

API_GROUP_VERSION = f"{API_GROUP}/{API_VERSION}"


class ObjectMeta(ApiModel):
    """The parts of metadata Distillery reads; the rest of a real object's metadata is kept as is."""

    model_config = {"extra": "allow"}

    name: str = Field(description="The run's name: see :mod:`.names` for the rule.")
    namespace: str | None = Field(default=None, max_length=63)
    labels: dict[str, str] | None = None
    annotations: dict[str, str] | None = None
    generation: int | None = None
    uid: str | None = None

    @field_validator("name")
    @classmethod
    def _run_name(cls, v: str) -> str:
        problem = run_name_problem(v)
        if problem is not None:
            raise ValueError(problem)
        return v


class DistillationRun(ApiModel):
    api_version: Literal["distillery.dev/v1alpha1"] = Field(
        default="distillery.dev/v1alpha1", alias="apiVersion"
    )
    kind: Literal["DistillationRun"] = "DistillationRun"
    metadata: ObjectMeta
    spec: DistillationRunSpec
    status: DistillationRunStatus | None = None


@dataclass
class SpecError(Exception):
    """A document that is not a valid DistillationRun: every problem with its field path."""

    errors: list[tuple[str, str]]
    source: str = ""

    def __str__(self) -> str:
        head = f"{self.source}: " if self.source else ""
        return (
            head + "invalid DistillationRun:\n" + "\n".join(f"  {p or '<root>'}: {m}" for p, m in self.errors)
        )


def parse_run(doc: Any, source: str = "") -> DistillationRun:
    """Validate one decoded document; raises :class:`SpecError` listing every error with its path."""
    if not isinstance(doc, dict):
        raise SpecError([("", f"expected a mapping (a Kubernetes object), got {type(doc).__name__}")], source)
    try:
        return DistillationRun.model_validate(doc)
    except ValidationError as exc:
        raise SpecError(format_errors(exc), source) from None


@dataclass
class YamlSyntaxError(SpecError):
    """A file that is not YAML: one line, ``FILE:LINE:COLUMN: YAML syntax error: what``, as editors read it."""

    line: int = 0
    column: int = 0

    def __str__(self) -> str:
        return f"{self.source}:{self.line}:{self.column}: {self.errors[0][1]}"


def load_documents(path: str | Path) -> Iterator[tuple[int, Any]]:
    """``(index, document)`` for every non-empty YAML document in a file (``-`` is not supported here).
    Raises :class:`YamlSyntaxError` (with the line and column, 1-based) when the text is not YAML."""
    text = Path(path).read_text(encoding="utf-8")
    docs = yaml.load_all(text, Loader=YamlLoader)
    i = 0
    while True:
        try:
            doc = next(docs)
        except StopIteration:
            return
        except yaml.YAMLError as exc:
            raise _syntax_error(path, exc) from None
        if doc is not None:
            yield i, doc
        i += 1


def _syntax_error(path: str | Path, exc: yaml.YAMLError) -> YamlSyntaxError:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    line, column = (mark.line + 1, mark.column + 1) if mark is not None else (0, 0)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    context = getattr(exc, "context", None)
    what = f"{problem} ({context})" if context else problem
    return YamlSyntaxError([("", f"YAML syntax error: {what}")], str(path), line, column)


class YamlLoader(yaml.SafeLoader):
    """YAML as kubectl reads it: ``2e-5`` is a float (PyYAML's YAML 1.1 resolver makes it a string)."""


YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=YamlLoader)


def load_run(path: str | Path) -> DistillationRun:
    """The single DistillationRun in a YAML file."""
    runs = [parse_run(doc, f"{path}#{i}") for i, doc in load_documents(path) if _is_run(doc)]
    if len(runs) != 1:
        raise SpecError([("", f"expected one DistillationRun in the file, found {len(runs)}")], str(path))
    return runs[0]


def _is_run(doc: Any) -> bool:
    return isinstance(doc, dict) and doc.get("kind", KIND) == KIND


def dump_yaml(run: DistillationRun, *, exclude_defaults: bool = False) -> str:
    return yaml.safe_dump(run.to_dict(exclude_defaults=exclude_defaults), sort_keys=False)
