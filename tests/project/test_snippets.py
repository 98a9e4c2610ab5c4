"""Every snippet of the README and docs/ is tested, so a platform engineer can follow them to the letter.

Extracted from ``README.md`` and ``docs/*.md``:

- YAML blocks: a DistillationRun is validated as ``distillery validate`` judges it (for a cluster); a spec
  excerpt (``spec:`` at the top, or indented keys of a spec) is merged into a valid run and validated;
  chart values are rendered by the real ``helm`` and checked against ``values.schema.json``; other
  Kubernetes objects are checked by ``kubernetes-validate`` where it has a schema (Argo CD, Kueue: not).
- inline spans that set a run's field (```storage.pvc: {claimName: d}```, ```student: {model: ...}```).
- every ``helm``, ``kubectl`` and ``distillery`` command, in shell blocks and inline spans: ``distillery``
  commands parse with its own argument parser (usage lines, with ``[...]``: their flags exist); ``helm``
  and ``kubectl`` commands name subcommands and flags their real ``--help`` lists; ``helm install`` /
  ``upgrade`` / ``template`` render with their ``--set`` values; a ``kubectl`` command on a run names
  its namespace (runs live in a team's namespace, not in the default one).
- a ``text`` block that starts with ``$ distillery validate FILE`` is that command's exact output, FILE
  being the YAML block marked with its name.

Markers, an HTML comment on the line before a block (invisible on GitHub):
``<!-- snippet: invalid -->`` (a run the docs show refused), ``<!-- snippet: local -->`` (a run for
``distillery run``: checked with ``--target local``), ``<!-- snippet: file NAME -->`` (the block is the
file NAME of the next ``$ distillery validate`` block), ``<!-- snippet: skip REASON -->``; several
separated by commas (``invalid, file bad.yaml``).
"""

from __future__ import annotations

import functools
import json
import re
import shlex
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from distillery_operator.cli import build_parser
from distillery_operator.validate import LOCAL, validate_document
from distillery_trainer.api.resource import load_yaml

from tests.conftest import REPO
from tests.support.builders import DELETE, make_run
from tests.support.fetch_k8s_tools import fetch

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
CHART = REPO / "charts" / "distillery"
FENCE = re.compile(r"(?:<!-- snippet: (?P<mark>[^>]*?) -->\n)?```(?P<lang>\w*)\n(?P<body>.*?)```", re.S)
INLINE = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")
TOOLS = ("helm", "kubectl", "distillery")
SPEC_FIELDS = set(make_run().storage().obj()["spec"]) | {
    "collection",
    "training",
    "serving",
    "evaluation",
    "cost",
    "storage",
    "scheduling",
    "huggingFace",
}
VALUES_KEYS = set(yaml.safe_load((CHART / "values.yaml").read_text()))


@dataclass(frozen=True)
class Block:
    page: str
    line: int
    lang: str
    body: str
    mark: str

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"


def _blocks() -> list[Block]:
    out = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for m in FENCE.finditer(text):
            line = text.count("\n", 0, m.start("lang")) + 1
            out.append(Block(page.relative_to(REPO).as_posix(), line, m["lang"], m["body"], m["mark"] or ""))
    return out


BLOCKS = _blocks()


def _prose(page: Path) -> Iterator[tuple[int, str]]:
    """(line, text) of the page outside fenced blocks."""
    text = page.read_text(encoding="utf-8")
    yield from enumerate(FENCE.sub(lambda m: "\n" * m[0].count("\n"), text).splitlines(), 1)


def _spans() -> list[tuple[str, str]]:
    return [
        (f"{page.relative_to(REPO).as_posix()}:{n}", span)
        for page in PAGES
        for n, line in _prose(page)
        for span in INLINE.findall(line)
    ]


SPANS = _spans()


# ---------------------------------------------------------------------------------------------- YAML


def _kind(block: Block, doc: Any) -> str:
    if not isinstance(doc, dict):
        return "other"
    if doc.get("kind") == "DistillationRun":
        return "run"
    if "apiVersion" in doc and "kind" in doc:
        return "object"
    if set(doc) == {"spec"} or (block.body.startswith("  ") and set(doc) <= SPEC_FIELDS):
        return "spec"
    if set(doc) <= VALUES_KEYS:
        return "values"
    return "other"


YAML_BLOCKS = [b for b in BLOCKS if b.lang == "yaml" and not b.mark.startswith("skip")]


def _run_with(spec: dict[str, Any]) -> dict[str, Any]:
    """A valid run with ``spec`` merged in; a one-of the excerpt sets (the prompts' source, the teacher's,
    the volume) replaces the run's own, and a method that needs the teacher's logprobs gets a self-hosted
    teacher."""
    run = make_run("snippet", "team-a").storage()
    if "prompts" in (spec.get("data") or {}):
        run.spec({"data": {"prompts": DELETE}})
    if "selfHosted" in (spec.get("teacher") or {}):
        run.spec({"teacher": {"endpoint": DELETE}})
    elif (spec.get("training") or {}).get("method") in ("kd", "onPolicy"):
        run.self_hosted()  # the methods that need the teacher's logprobs: a teacher that gives them
    if "storage" in spec:
        run.spec({"storage": DELETE})
    return run.spec(spec).obj()


def _refused(doc: dict[str, Any], mark: str) -> list[tuple[str, str]]:
    return validate_document(doc, target=LOCAL if "local" in mark else "cluster").errors


@pytest.mark.parametrize("block", YAML_BLOCKS, ids=[b.where for b in YAML_BLOCKS])
def test_yaml_blocks(block: Block, helm_values: dict[str, str]) -> None:
    docs = [d for d in yaml.safe_load_all(textwrap.dedent(block.body)) if d is not None]
    assert docs, block.where
    for doc in docs:
        kind = _kind(block, doc)
        if kind in ("run", "spec"):
            run = load_yaml(yaml.safe_dump(doc)) if kind == "run" else _run_with(doc.get("spec", doc))
            errors = _refused(run, block.mark)
            if "invalid" in block.mark:
                assert errors, f"{block.where}: marked invalid, but valid"
            else:
                assert errors == [], f"{block.where}: {errors}"
        elif kind == "object":
            try:
                kubernetes_validate.validate(doc, "1.30.0", strict=True)
            except kubernetes_validate.SchemaNotFoundError:
                assert doc["apiVersion"].split("/")[0] in {"argoproj.io", "kueue.x-k8s.io"}, block.where
        elif kind == "values":
            assert helm_values[block.where] == "", (
                f"{block.where}: helm template failed:\n{helm_values[block.where]}"
            )
            jsonschema.Draft7Validator(json.loads((CHART / "values.schema.json").read_text())).validate(doc)
        else:
            pytest.fail(f"{block.where}: a YAML block of no known kind: mark it <!-- snippet: skip why -->")


# A span that sets a run's field: `storage.pvc: {claimName: d}`, `student: {model: pvc://models/x}`.
FIELD_SPAN = re.compile(r"^(?P<path>[a-z][A-Za-z]*(?:\.[a-z][A-Za-z]*)*): (?P<value>\{.*\}|[^{}\s]+)$")
FIELD_SPANS = [
    (where, span)
    for where, span in SPANS
    if (m := FIELD_SPAN.match(span)) and m["path"].split(".")[0] in SPEC_FIELDS and "..." not in span
]


@pytest.mark.parametrize(("where", "span"), FIELD_SPANS, ids=[w for w, _ in FIELD_SPANS])
def test_inline_fields_of_a_run_are_valid(where: str, span: str) -> None:
    m = FIELD_SPAN.match(span)
    assert m is not None
    value: Any = yaml.safe_load(m["value"])
    for part in reversed(m["path"].split(".")):
        value = {part: value}
    errors = validate_document(_run_with(value)).errors
    if not m["value"].startswith("{"):  # one field set: its own path must be accepted, not its section
        errors = [(p, msg) for p, msg in errors if p == f"spec.{m['path']}" or "unknown field" in msg]
    assert errors == [], f"{where}: `{span}`"


def test_there_are_snippets() -> None:
    assert len(YAML_BLOCKS) >= 10 and len(FIELD_SPANS) >= 3 and len(COMMANDS) >= 30


# ---------------------------------------------------------------------------------------------- commands


def _segments(line: str) -> Iterator[list[str]]:
    lex = shlex.shlex(line, posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    lex.commenters = "#"
    try:
        tokens = list(lex)
    except ValueError:
        return
    seg: list[str] = []
    for t in [*tokens, ";"]:
        if t and set(t) <= set("|&;()<>"):
            if seg:
                yield seg
            seg = []
        else:
            seg.append(t)


def _command(seg: list[str]) -> list[str] | None:
    """The segment from its tool on (after env assignments, `$(`, a .venv/bin/ prefix), or None."""
    for i, t in enumerate(seg):
        name = t.rsplit("/", 1)[-1].lstrip("$")
        if name in TOOLS:
            return [name, *seg[i + 1 :]]
        if "=" not in t and t != "$":
            return None
    return None


def _commands() -> list[tuple[str, list[str], bool]]:
    """(where, argv, is_usage): shell blocks' lines and inline spans naming a tool."""
    out = []
    for b in BLOCKS:
        if b.lang not in ("sh", "bash") or b.mark.startswith("skip"):
            continue
        text = b.body.replace("\\\n", " ")
        for n, line in enumerate(text.splitlines()):
            for seg in _segments(line):
                if (cmd := _command(seg)) is not None:
                    usage = any(t.startswith("[") or t.endswith("]") for t in cmd)
                    argv = [t.strip("[]") for t in cmd] if usage else cmd
                    out.append((f"{b.where}+{n + 1}", argv, usage))
    # Inline spans mention a command (often as a usage line): its subcommand and flags must exist.
    for where, span in SPANS:
        tokens = [t for t in re.split(r"\s+", re.sub(r"[\[\]]|\\\|", " ", span)) if t and t != "..."]
        if len(tokens) < 2 or tokens[0].rsplit("/", 1)[-1] not in TOOLS:
            continue
        out.append((where, [tokens[0].rsplit("/", 1)[-1], *tokens[1:]], True))
    return out


COMMANDS = _commands()


def _flags(argv: list[str]) -> list[str]:
    """The flags of a command line, up to ``--`` (what follows is the command's own: ``exec ... --``);
    ``-it`` is ``-i -t``."""
    out: list[str] = []
    for t in argv:
        if t == "--":
            break
        if re.match(r"^--[A-Za-z]", t):
            out.append(t.split("=", 1)[0])
        elif re.match(r"^-[A-Za-z]+$", t):
            out += [f"-{c}" for c in t[1:]]
        elif re.match(r"^-[A-Za-z]=", t):
            out.append(t[:2])
    return out


@pytest.mark.parametrize(
    ("where", "argv", "usage"),
    [c for c in COMMANDS if c[1][0] == "distillery"],
    ids=[f"{w} {' '.join(a[:2])}" for w, a, _ in COMMANDS if a[0] == "distillery"],
)
def test_distillery_commands_parse(where: str, argv: list[str], usage: bool) -> None:
    parser = build_parser()
    if usage:  # a usage line: the subcommand and its flags exist
        sub = argv[1]
        help_text = _distillery_help(sub)
        for flag in _flags(argv[2:]):
            assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", help_text), f"{where}: {flag}"
        return
    try:
        parser.parse_args(argv[1:])
    except SystemExit as exc:
        pytest.fail(f"{where}: `{' '.join(argv)}` does not parse (exit {exc.code})")


@functools.cache
def _distillery_help(sub: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "distillery_operator.cli", sub, "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0, f"no subcommand {sub}"
    return out.stdout


@functools.cache
def _tool(name: str) -> Path:
    return fetch()[name]


@functools.cache
def _help(tool: str, path: tuple[str, ...]) -> tuple[frozenset[str], frozenset[str]]:
    """(subcommands, flags) that ``tool path... --help`` lists (kubectl: with ``kubectl options``)."""
    out = subprocess.run([_tool(tool), *path, "--help"], capture_output=True, text=True, timeout=60)
    text = out.stdout + out.stderr
    if tool == "kubectl":
        text += subprocess.run([_tool(tool), "options"], capture_output=True, text=True, timeout=60).stdout
    subs: set[str] = set()
    section = False
    for line in text.splitlines():
        if re.match(r"^[A-Z][\w ()]*:\s*$", line):
            section = "Commands" in line or "Available" in line
            continue
        if section and (m := re.match(r"^\s+([a-z][\w-]*)\s", line)):
            subs.add(m[1])
    flags = set(re.findall(r"(?<![\w-])(--[a-z][\w-]*)", text)) | set(
        re.findall(r"(?<![\w-])(-[a-zA-Z]),", text)
    )
    return frozenset(subs), frozenset(flags)


def _subcommand_path(tool: str, argv: list[str]) -> tuple[str, ...]:
    path: list[str] = []
    for t in argv[1:]:
        if t.startswith("-"):
            continue
        subs, _ = _help(tool, tuple(path))
        if t in subs:
            path.append(t)
        elif path:
            break
    return tuple(path)


K8S = [c for c in COMMANDS if c[1][0] in ("helm", "kubectl")]


@pytest.mark.parametrize(("where", "argv", "usage"), K8S, ids=[f"{w} {' '.join(a[:3])}" for w, a, _ in K8S])
def test_helm_and_kubectl_commands_name_what_exists(where: str, argv: list[str], usage: bool) -> None:
    tool = argv[0]
    path = _subcommand_path(tool, argv)
    assert path, f"{where}: `{' '.join(argv)}` names no {tool} subcommand"
    _, flags = _help(tool, path)
    for flag in _flags(argv[1:]):
        assert flag in flags, f"{where}: `{tool} {' '.join(path)}` has no flag {flag}"
    on_a_run = any(re.match(r"^(drun|distillationruns?)(/|$)", t) for t in argv)
    if tool == "kubectl" and on_a_run and not usage:
        names_ns = any(f in ("-n", "--namespace", "-A", "--all-namespaces") for f in _flags(argv))
        assert names_ns or "-f" in argv, f"{where}: a run lives in a team's namespace: add -n"


HELM_RENDERS = [
    (w, a)
    for w, a, usage in K8S
    if a[0] == "helm" and len(a) > 1 and a[1] in ("install", "upgrade", "template")
]


@pytest.fixture(scope="module")
def helm_values(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """``helm template`` of every values block, one process each (the module renders them once)."""
    tmp = tmp_path_factory.mktemp("values")
    out: dict[str, str] = {}
    for b in YAML_BLOCKS:
        docs = [d for d in yaml.safe_load_all(b.body) if d is not None]
        if not docs or _kind(b, docs[0]) != "values":
            continue
        f = tmp / f"{len(out)}.yaml"
        f.write_text(b.body)
        res = subprocess.run(
            [_tool("helm"), "template", "distillery", CHART, "-n", "distillery-system", "-f", f],
            capture_output=True,
            text=True,
            timeout=120,
        )
        out[b.where] = "" if res.returncode == 0 else res.stderr
    return out


@pytest.mark.parametrize(("where", "argv"), HELM_RENDERS, ids=[w for w, _ in HELM_RENDERS])
def test_helm_installs_render(where: str, argv: list[str]) -> None:
    keep: list[str] = []
    it = iter(argv[2:])
    for t in it:
        if t in ("--set", "--set-string", "-f", "--values", "-n", "--namespace"):
            value = next(it)
            if t in ("-f", "--values") and not (REPO / value).is_file():
                pytest.skip(f"{where}: {value} is the reader's own file")
            keep += [t, value]
        elif t.startswith(("--set=", "--set-string=", "--namespace=")):
            keep.append(t)
    res = subprocess.run(
        [_tool("helm"), "template", "distillery", CHART, *keep], capture_output=True, text=True, cwd=REPO
    )
    assert res.returncode == 0, f"{where}: {res.stderr}"


# ---------------------------------------------------------------------------------------------- outputs


def test_validate_outputs_are_what_validate_prints(tmp_path: Path) -> None:
    files = {m[1]: b.body for b in BLOCKS if (m := re.search(r"\bfile (\S+)", b.mark))}
    outputs = [b for b in BLOCKS if b.lang == "text" and b.body.startswith("$ distillery validate")]
    assert outputs, "the README shows validate's output"
    for b in outputs:
        command, *shown = b.body.rstrip("\n").splitlines()
        argv = shlex.split(command[2:])
        for name in argv[2:]:
            if not name.startswith("-"):
                assert name in files, (
                    f"{b.where}: mark the YAML block of {name} with <!-- snippet: file {name} -->"
                )
                (tmp_path / name).write_text(files[name])
        res = subprocess.run(
            [sys.executable, "-m", "distillery_operator.cli", *argv[1:]],
            capture_output=True,
            text=True,
            cwd=tmp_path,
        )
        printed = (res.stdout + res.stderr).rstrip("\n").splitlines()
        assert printed == shown, f"{b.where}: validate prints\n" + "\n".join(printed)


def test_the_metrics_service_is_named_as_documented() -> None:
    """The docs name the metrics Service `<fullname>-metrics`: for a release `ml` that is ml-distillery-metrics,
    not `<release>-metrics` (which a release named `distillery` hides)."""
    res = subprocess.run(
        [_tool("helm"), "template", "ml", CHART, "--set", "metrics.enabled=true"],
        capture_output=True,
        text=True,
        check=True,
    )
    services = [
        d["metadata"]["name"] for d in yaml.safe_load_all(res.stdout) if d and d.get("kind") == "Service"
    ]
    assert "ml-distillery-metrics" in services
    for page in (REPO / "README.md", REPO / "docs" / "install.md"):
        text = page.read_text(encoding="utf-8")
        assert "`<fullname>-metrics`" in text and "<release>-metrics" not in text, page
