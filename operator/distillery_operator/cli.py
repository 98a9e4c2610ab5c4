"""``distillery``: validate a run, print the CRD, run the operator, or run a DistillationRun on this machine.

Heavy imports stay inside the command that needs them, so ``distillery --help`` is instant.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path


def _cmd_validate(args: argparse.Namespace) -> int:
    from .validate import summary, validate_file

    status = 0
    for path in args.files:
        if not Path(path).is_file():
            print(f"{path}: no such file", file=sys.stderr)
            status = 1
            continue
        for report in validate_file(path):
            if report.ok and report.run is not None:
                print(f"{path}: {summary(report.run)}")
            else:
                status = 1
                print(
                    f"{report.source}: invalid DistillationRun ({len(report.errors)} error(s))",
                    file=sys.stderr,
                )
                for p, m in report.errors:
                    print(f"  {p or '<root>'}: {m}", file=sys.stderr)
    return status


def _cmd_crd(args: argparse.Namespace) -> int:
    from .crd import render_crd

    text = render_crd()
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from distillery_trainer import __version__

    parser = argparse.ArgumentParser(
        prog="distillery",
        description="Distill an LLM teacher into a smaller student: on Kubernetes, or on this machine.",
    )
    parser.add_argument("--version", action="version", version=f"distillery {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "validate",
        help="check DistillationRun files offline (CRD schema, CEL rules, model rules)",
        description="Validate DistillationRun YAML files offline. Prints every error with its field path; "
        "exit code 1 when any file is invalid.",
    )
    p.add_argument("files", nargs="+", metavar="FILE.yaml")
    p.set_defaults(func=_cmd_validate)

    p = sub.add_parser(
        "crd",
        help="print the CustomResourceDefinition generated from the model",
        description="Print the DistillationRun CRD (what crds/ holds), generated from the API model.",
    )
    p.add_argument("-o", "--output", metavar="FILE", help="write to FILE instead of standard output")
    p.set_defaults(func=_cmd_crd)

    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
