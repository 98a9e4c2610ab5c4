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


def _cmd_operator(args: argparse.Namespace) -> int:
    import logging

    import kopf

    from . import handlers  # noqa: F401  (registers the handlers)
    from .settings import Settings, parse_node_selector

    try:
        config = Settings.from_env().with_overrides(
            trainer_image=args.trainer_image,
            vllm_image=args.vllm_image,
            queue_name=args.queue_name,
            priority_class_name=args.priority_class,
            node_selector=parse_node_selector(args.node_selector) if args.node_selector else None,
        )
    except ValueError as exc:
        print(f"distillery operator: {exc}", file=sys.stderr)
        return 2
    level = logging.DEBUG if args.debug else logging.INFO if args.verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(name)s [%(levelname)s] %(message)s")
    logging.getLogger("distillery").setLevel(min(level, logging.INFO))
    if not args.debug:  # one "Handler ... succeeded" line per watch event is noise, not news
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    namespaces = list(args.namespace or [])
    kopf.run(
        clusterwide=not namespaces,
        namespaces=namespaces,
        standalone=args.peering is None,
        peering_name=args.peering,
        liveness_endpoint=args.liveness,
        memo=kopf.Memo(config=config),
    )
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

    p = sub.add_parser(
        "operator",
        help="run the Kubernetes operator (kopf) that reconciles DistillationRuns",
        description="Run the operator: watch DistillationRuns and their children, and drive each run "
        "through collect, train, serve and evaluate. Credentials: the pod's service account, or $KUBECONFIG. "
        "Defaults come from DISTILLERY_* environment variables; the flags override them.",
    )
    scope = p.add_mutually_exclusive_group()
    scope.add_argument(
        "-n", "--namespace", action="append", metavar="NS", help="watch this namespace (repeatable)"
    )
    scope.add_argument(
        "-A", "--all-namespaces", action="store_true", help="watch every namespace (the default)"
    )
    p.add_argument(
        "--peering", metavar="NAME", help="coordinate with other operator replicas through this KopfPeering"
    )
    p.add_argument(
        "--liveness", metavar="URL", help="serve a liveness probe, e.g. http://0.0.0.0:8080/healthz"
    )
    p.add_argument("--trainer-image", help="image of the stage pods (env DISTILLERY_TRAINER_IMAGE)")
    p.add_argument("--vllm-image", help="vLLM OpenAI-server image (env DISTILLERY_VLLM_IMAGE)")
    p.add_argument(
        "--queue-name", help="default Kueue LocalQueue of the workloads (env DISTILLERY_QUEUE_NAME)"
    )
    p.add_argument(
        "--priority-class", help="default PriorityClass of the pods (env DISTILLERY_PRIORITY_CLASS)"
    )
    p.add_argument(
        "--node-selector", metavar="K=V[,K=V]", help="default node selector (env DISTILLERY_NODE_SELECTOR)"
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log what the operator does")
    p.add_argument("--debug", action="store_true", help="log everything, kopf's internals included")
    p.set_defaults(func=_cmd_operator)

    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
