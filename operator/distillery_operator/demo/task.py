"""The demo's task: pull the agreement date out of a short contract clause.

Narrow, checkable, and of the kind the seed's contract-analysis case implies. Each prompt is a one-shot
chat (an example clause and its date, then the clause to read): SmolLM2-135M-Instruct answers 96 of 100
such prompts exactly (without the example it answers in full sentences and exact match is 0 %). Every
prompt carries its ``reference`` date, so the evaluation scores both teacher and student against it.
Deterministic: the same seed gives the same prompts (``examples/data/contract-dates.jsonl`` is this
generator's output; a test keeps the two equal).
"""

from __future__ import annotations

import json
import random
from typing import Any

MONTHS = [
    "January", "February", "March", "April", "May", "June",
    "July", "August", "September", "October", "November", "December",
]  # fmt: skip
KINDS = [
    "Services Agreement", "Non-Disclosure Agreement", "Master Supply Agreement", "Lease Agreement",
    "Consulting Agreement", "License Agreement", "Employment Agreement", "Purchase Agreement",
]  # fmt: skip
PARTIES = [
    "Acme Corp", "Globex LLC", "Initech Inc.", "Umbrella Holdings", "Stark Industries", "Wayne Enterprises",
    "Hooli", "Vandelay Imports", "Soylent Co.", "Cyberdyne Systems", "Tyrell Corporation", "Wonka Industries",
]  # fmt: skip
TEMPLATES = [
    "This {kind} is entered into as of {date} by and between {a} and {b}.",
    "{a} and {b} signed this {kind} on {date}.",
    'The {kind} between {a} (the "Company") and {b} is dated {date}.',
    "Effective {date}, {a} and {b} agree to the terms of this {kind}.",
    "This {kind}, made on {date}, is between {a} and {b}.",
]
EXAMPLE_CLAUSE = "This Lease Agreement is made on April 2, 2019 between Foo Inc. and Bar LLC."
EXAMPLE_DATE = "April 2, 2019"
CATEGORIES = ["entered-into", "signed-on", "dated", "effective", "made-on"]


def prompt_messages(clause: str) -> list[dict[str, str]]:
    return [
        {"role": "user", "content": f"Clause: {EXAMPLE_CLAUSE}\nDate:"},
        {"role": "assistant", "content": EXAMPLE_DATE},
        {"role": "user", "content": f"Clause: {clause}\nDate:"},
    ]


def generate(n: int = 400, seed: int = 7) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        date = f"{rng.choice(MONTHS)} {rng.randint(1, 28)}, {rng.randint(2015, 2025)}"
        a, b = rng.sample(PARTIES, 2)
        t = rng.randrange(len(TEMPLATES))
        clause = TEMPLATES[t].format(kind=rng.choice(KINDS), date=date, a=a, b=b)
        rows.append(
            {
                "id": f"contract-{i:04d}",
                "messages": prompt_messages(clause),
                "reference": date,
                "category": CATEGORIES[t],
            }
        )
    return rows


def to_jsonl(rows: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
