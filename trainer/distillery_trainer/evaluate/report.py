"""The report a person reads: ``eval/report.md`` with PNG plots beside it.

Plots: the latency histogram (student, and the teacher when measured, with p50/p95 marked), retention per
category against the gate, and the training loss curve when training left one (``train/history.jsonl``
lines with ``step`` and ``loss``, or the newest checkpoint's Hugging Face ``trainer_state.json``). Plots
use matplotlib's object API (no pyplot, no display), rendered in memory and written atomically.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from ..api.status import CostResults
from ..cost import worth_it
from ..layout import RunLayout, atomic_write

REPORT_NAME = "report.md"
LOSS_HISTORY = "history.jsonl"  # under train/: one {"step", "loss"} line per log step


def loss_history(layout: RunLayout) -> list[tuple[int, float]]:
    """(step, loss) points of the training run, from whichever record training left."""
    points: list[tuple[int, float]] = []
    history = layout.train_dir / LOSS_HISTORY
    if history.exists():
        for line in history.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                row = json.loads(line)
                points.append((int(row["step"]), float(row["loss"])))
            except (ValueError, KeyError, TypeError):
                continue
    if not points and layout.checkpoints_dir.exists():
        states = sorted(layout.checkpoints_dir.glob("*/trainer_state.json"), key=lambda p: p.stat().st_mtime)
        if states:
            try:
                log = json.loads(states[-1].read_text(encoding="utf-8")).get("log_history", [])
                points = [(int(r["step"]), float(r["loss"])) for r in log if "loss" in r and "step" in r]
            except (ValueError, KeyError, TypeError):
                points = []
    return sorted(points)


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def plot_latency(student: list[float], teacher: list[float] | None) -> bytes:
    from matplotlib.figure import Figure

    from .stats import percentile

    fig = Figure(figsize=(7, 3.6))
    ax = fig.add_subplot()
    series = [("student", student, "tab:blue")]
    if teacher:
        series.append(("teacher", teacher, "tab:orange"))
    top = max(max(v) for _, v, _ in series if v) * 1000
    bins = [top * i / 40 for i in range(41)]
    for name, values, color in series:
        ms = [v * 1000 for v in values]
        ax.hist(ms, bins=bins, alpha=0.55, color=color, label=f"{name} (n={len(ms)})")
        for q, style in ((50, "--"), (95, ":")):
            x = percentile(ms, q)
            ax.axvline(x, color=color, linestyle=style, linewidth=1.2)
            ax.annotate(
                f"p{q} {x:.0f}", (x, ax.get_ylim()[1] * (0.92 if q == 50 else 0.8)), color=color, fontsize=8
            )
    from matplotlib.ticker import MaxNLocator

    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("end-to-end latency (ms)")
    ax.set_ylabel("requests")
    ax.set_title("Latency (streamed requests at the benchmark's concurrency)")
    ax.legend(fontsize=8)
    return _png(fig)


def plot_categories(categories: dict[str, dict[str, Any]], threshold: float) -> bytes:
    from matplotlib.figure import Figure

    names = [n for n, c in categories.items() if c.get("retention") is not None]
    values = [categories[n]["retention"] for n in names]
    lows = [v - (categories[n]["interval"] or {}).get("low", v) for n, v in zip(names, values, strict=True)]
    highs = [(categories[n]["interval"] or {}).get("high", v) - v for n, v in zip(names, values, strict=True)]
    fig = Figure(figsize=(max(4.5, 0.8 * len(names) + 2), 3.6))
    ax = fig.add_subplot()
    colors = ["tab:green" if v >= threshold else "tab:red" for v in values]
    ax.bar(names, values, color=colors, yerr=[lows, highs], capsize=4, alpha=0.8)
    ax.axhline(threshold, color="black", linestyle="--", linewidth=1, label=f"gate {threshold:g}")
    ax.set_ylabel("quality retention")
    ax.set_title("Retention per category (bootstrap interval)")
    ax.legend(fontsize=8)
    ax.tick_params(axis="x", labelrotation=30)
    return _png(fig)


def plot_loss(points: list[tuple[int, float]]) -> bytes:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 3.4))
    ax = fig.add_subplot()
    ax.plot([p[0] for p in points], [p[1] for p in points], color="tab:purple", linewidth=1.4)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title("Training loss")
    ax.grid(alpha=0.3)
    return _png(fig)


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _latency_row(name: str, s: dict[str, Any] | None) -> str:
    if not s or not s.get("latencyMs"):
        return f"| {name} | — | — | — | — | — | — | {sum((s or {}).get('errors', {}).values())} |"
    lat, ttft = s["latencyMs"], s.get("ttftMs") or {}
    return (
        f"| {name} | {lat['p50']:.0f} | {lat['p95']:.0f} | {lat['p99']:.0f} | {_fmt(ttft.get('p50'), 0)} | "
        f"{_fmt(ttft.get('p95'), 0)} | {_fmt(s.get('outputTokensPerSecond'), 1)} | {sum(s['errors'].values())} |"
    )


def _clip(text: str | None, n: int = 300) -> str:
    text = (text or "").replace("\n", " ").replace("|", "\\|")
    return text if len(text) <= n else text[: n - 1] + "…"


def write_report(layout: RunLayout, doc: dict[str, Any], examples: list[dict[str, Any]]) -> Path:
    """Render ``doc`` (what results.json holds) as Markdown with plots; returns the report's path."""
    out_dir = layout.eval_dir
    res, gate, quality = doc["results"], doc["gate"], doc["quality"]
    lat = doc["latency"]
    lines = [f"# Evaluation of `{doc['run']['namespace']}/{doc['run']['name']}`", ""]
    lines += [f"**{gate['verdict']}**", ""]
    lines += ["## Quality", ""]
    lines += [
        "| metric | retention | interval | student | teacher | prompts scored | errors |",
        "|---|---|---|---|---|---|---|",
    ]
    iv = res.get("retentionInterval")
    interval = f"{iv['low']:.3f} – {iv['high']:.3f} ({iv['confidence']:.0%})" if iv else "—"
    lines.append(
        f"| {res.get('metric', '—')} | {_fmt(res.get('qualityRetention'))} | {interval} | "
        f"{_fmt(res.get('studentScore'))} | {_fmt(res.get('teacherScore'))} | {_fmt(res.get('samples'))} | "
        f"{_fmt(res.get('errors'))} |"
    )
    lines += ["", f"Retention = {quality['formula']}.", ""]
    base = quality.get("baseline") or {}
    if base.get("score") is not None:
        lines += [
            f"Before training, the untrained student scored {_fmt(base['score'])} (retention "
            f"{_fmt(base.get('retention'))}) on {base.get('scored')} of these prompts, by the same scorer: "
            f"training took it to {_fmt(res.get('studentScore'))} against the teacher's "
            f"{_fmt(res.get('teacherScore'))}.",
            "",
        ]
    elif base.get("note"):
        lines += [f"No baseline (the untrained student): {base['note']}.", ""]
    if quality.get("metrics"):
        lines += [
            "| reference metric | student vs teacher | student vs reference | teacher vs reference |",
            "|---|---|---|---|",
        ]
        for name, m in quality["metrics"].items():
            lines.append(
                f"| {name} | {_fmt(m['agreementWithTeacher'])} | {_fmt(m['studentVsReference'])} | "
                f"{_fmt(m['teacherVsReference'])} |"
            )
        lines.append("")
    if quality.get("judge"):
        j = quality["judge"]
        lines += [
            f"Judge: {j['scored']} of {j['requested']} prompts scored (both orders); failures {j['failures'] or 'none'}; "
            f"student better on {j['studentWins']}, tie on {j['ties']}, teacher better on {j['teacherWins']}; "
            f"position consistency {_fmt(j['positionConsistency'], 2)}.",
            "",
        ]
    cats = quality.get("categories") or {}
    if cats:
        lines += [
            "### Per category",
            "",
            "| category | prompts | retention | interval | student | teacher |",
            "|---|---|---|---|---|---|",
        ]
        for name, c in cats.items():
            civ = c.get("interval")
            span = f"{civ['low']:.3f} – {civ['high']:.3f}" if civ else "—"
            lines.append(
                f"| {name} | {c['prompts']} | {_fmt(c['retention'])} | {span} | "
                f"{_fmt(c['studentScore'])} | {_fmt(c['teacherScore'])} |"
            )
        lines.append("")
        if any(c.get("retention") is not None for c in cats.values()):
            atomic_write(out_dir / "retention_by_category.png", plot_categories(cats, gate["threshold"]))
            lines += ["![retention per category](retention_by_category.png)", ""]
    lines += [
        "## Latency",
        "",
        "| endpoint | p50 ms | p95 ms | p99 ms | TTFT p50 ms | TTFT p95 ms | output tok/s | errors |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines.append(_latency_row("student", lat.get("student")))
    if lat.get("teacher"):
        lines.append(_latency_row("teacher", lat["teacher"]))
    if lat.get("requests") is not None:
        max_tokens = (lat.get("sampling") or {}).get("max_tokens")
        lines += [
            "",
            f"Measured the same way for each endpoint: {lat['requests']} streamed requests at concurrency "
            f"{lat['concurrency']}, after {lat.get('warmupRequests', 0)} warm-up requests that are not counted; "
            f"the held-out prompts in turn, the same sampling"
            + (f" (at most {max_tokens} output tokens)" if max_tokens else "")
            + ". Latency is end to end, from sending a request to the end of its stream.",
        ]
    if lat.get("teacherNote"):
        lines += ["", f"Teacher: {lat['teacherNote']}"]
    lines.append("")
    student_lat = (lat.get("student") or {}).get("latencySeconds") or []
    if student_lat:
        teacher_lat = (lat.get("teacher") or {}).get("latencySeconds") or None
        atomic_write(out_dir / "latency.png", plot_latency(student_lat, teacher_lat))
        lines += ["![latency histogram](latency.png)", ""]
    cost = res.get("cost") or {}
    # The teacher's scoring of an onPolicy training gets its own column; the other methods have none.
    scoring = cost.get("teacherScoringUSD") is not None
    once = ["collectionUSD", "trainingUSD", *(["teacherScoringUSD"] if scoring else []), "totalUSD"]
    lines += [
        "## Cost",
        "",
        "| collection | training | "
        + ("teacher scoring (on-policy) | " if scoring else "")
        + "total (once) | student / month | teacher API / month | student ÷ teacher | break-even (requests / month) |",
        "|---|---|---|---|---|---|---|" + ("---|" if scoring else ""),
    ]
    even = cost.get("breakEvenRequestsPerMonth")
    lines.append(
        "| "
        + " | ".join(
            f"${cost[k]:,.2f}" if cost.get(k) is not None else "—"
            for k in (*once, "servingUSDPerMonth", "teacherUSDPerMonth")
        )
        + f" | {_fmt(cost.get('studentToTeacherCost'), 2)}× | {f'{even:,}' if even is not None else '—'} |"
    )
    inputs = doc.get("cost") or {}  # what the figures were computed from
    if scoring and inputs.get("teacherTokensScored") is not None:
        hours = inputs.get("teacherGpuHours")
        how = (
            f"priced as {hours:.3f} device-hours of the self-hosted teacher kept up for the training"
            if hours is not None
            else "priced as input tokens"
        )
        lines += [
            "",
            f"The teacher scored {inputs['teacherTokensScored']:,} tokens of the student's samples ({how}).",
        ]
    sentence = worth_it(CostResults.model_validate(cost)) if cost else None
    if sentence:
        lines += ["", sentence]
    lines.append("")
    points = loss_history(layout)
    if len(points) >= 2:
        atomic_write(out_dir / "loss.png", plot_loss(points))
        lines += ["## Training", "", "![training loss](loss.png)", ""]
    if examples:
        with_base = any(ex.get("baseline") is not None for ex in examples)
        head = "| prompt | teacher | student |" + (" untrained student |" if with_base else "")
        lines += ["## Examples", "", head, "|---|---|---|" + ("---|" if with_base else "")]
        for ex in examples:
            row = f"| {_clip(ex['prompt'], 160)} | {_clip(ex['teacher'])} | {_clip(ex['student'])} |"
            lines.append(row + (f" {_clip(ex.get('baseline'))} |" if with_base else ""))
        lines.append("")
    if doc.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in doc["notes"]] + [""]
    path = out_dir / REPORT_NAME
    atomic_write(path, "\n".join(lines))
    return path
