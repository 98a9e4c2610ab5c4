"""The base of every API type: camelCase on the wire, snake_case in Python, unknown fields rejected.

Cross-field rules raise :class:`RuleViolations`, which carries field paths relative to the model that
checked them; :func:`format_errors` joins them to the path pydantic reports, so every message names the
full field path (``spec.training.method: ...``) and the fix.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic.alias_generators import to_camel

API_GROUP = "distillery.dev"
API_VERSION = "v1alpha1"
KIND = "DistillationRun"
PLURAL = "distillationruns"
SINGULAR = "distillationrun"
SHORT_NAMES = ["drun"]
CATEGORIES = ["distillery"]


def _camel(name: str) -> str:
    # Acronyms the Kubernetes API conventions spell in capitals (baseURL, inputPerMTokUSD).
    out = to_camel(name)
    for tail, fixed in (("Usd", "USD"), ("Url", "URL"), ("Mtok", "MTok")):
        out = out.replace(tail, fixed)
    return out


class ApiModel(BaseModel):
    """camelCase aliases, snake_case attributes, ``extra="forbid"`` so a typo is an error with its path."""

    model_config = ConfigDict(
        alias_generator=_camel,
        populate_by_name=True,
        extra="forbid",
        use_enum_values=True,
        validate_default=False,
    )

    def to_dict(self, *, exclude_defaults: bool = False) -> dict[str, Any]:
        """The wire form: camelCase keys, ``None`` fields left out."""
        return self.model_dump(
            by_alias=True, exclude_none=True, mode="json", exclude_defaults=exclude_defaults
        )


class RuleViolations(ValueError):
    """One or more cross-field rule failures, each with a path relative to the validating model."""

    def __init__(self, violations: Sequence[tuple[str, str]]) -> None:
        self.violations = list(violations)
        super().__init__("; ".join(f"{p}: {m}" if p else m for p, m in self.violations))


class Rules:
    """Collects rule failures inside a ``model_validator`` and raises them together."""

    def __init__(self) -> None:
        self._found: list[tuple[str, str]] = []

    def check(self, ok: bool, path: str, message: str) -> None:
        if not ok:
            self._found.append((path, message))

    def fail(self, path: str, message: str) -> None:
        self._found.append((path, message))

    def raise_if_any(self) -> None:
        if self._found:
            raise RuleViolations(self._found)


def join_path(parts: Iterable[str | int]) -> str:
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part:
            out += f".{part}" if out else str(part)
    return out


def format_errors(exc: ValidationError, prefix: Sequence[str | int] = ()) -> list[tuple[str, str]]:
    """``(field path, message)`` for every error in ``exc``, rule violations expanded to their own paths."""
    out: list[tuple[str, str]] = []
    for err in exc.errors(include_url=False):
        loc = [*prefix, *[p for p in err["loc"] if not _is_union_tag(p)]]
        cause = (err.get("ctx") or {}).get("error")
        if isinstance(cause, RuleViolations):
            for rel, msg in cause.violations:
                out.append((join_path([*loc, *rel.split(".")] if rel else loc), msg))
            continue
        msg = err["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        if err["type"] == "extra_forbidden":
            msg = "unknown field (check its spelling and indentation; see `distillery crd` for the schema)"
        out.append((join_path(loc), msg))
    return out


def _is_union_tag(part: str | int) -> bool:
    # pydantic puts the union member's name in the path ("function-after[...]", "str"); not a field.
    return isinstance(part, str) and ("[" in part or part in {"str", "int", "float", "bool"})
