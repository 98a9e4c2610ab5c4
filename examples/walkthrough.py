"""Watch a run's status fill in: the emulator, the real operator, and the controllers played by hand.

    .venv/bin/python examples/walkthrough.py [examples/run.yaml] [--retention 0.91]

Applies the run to the API emulator, starts ``distillery operator``, then plays the Job, PyTorchJob and
Deployment controllers exactly as the operator tests do (pods that report through their termination
messages), printing the run's status after every step, and the Events at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import kmock
from distillery_trainer.api.resource import load_yaml
from distillery_trainer.api.status import CostResults
from distillery_trainer.cost import worth_it

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: the tests' emulator

from tests.conftest import EXAMPLES  # noqa: E402
from tests.support.kube.cluster import Cluster, Operator, now, write_kubeconfig  # noqa: E402
from tests.support.kube.emulator import ApiServer, declare_resources  # noqa: E402
from tests.support.reports import progress, results, summaries  # noqa: E402


def show(title: str, status: dict[str, Any]) -> None:
    conditions = ", ".join(f"{c['type']}={c['status']}({c['reason']})" for c in status.get("conditions", []))
    print(f"\n== {title}: phase {status.get('phase')} | {conditions}")
    print(f"   message: {status.get('message')}")
    for stage in ("collection", "training", "serving", "evaluation"):
        st = status.get(stage) or {}
        print(f"   {stage:<10} {st.get('state', '-'):<9} {st.get('message', '')}")
    if status.get("results"):
        res = status["results"]
        print(
            f"   results: retention {res.get('qualityRetention')}, p95 {res['latencyMs']['p95']} ms, gate {res.get('gatePassed')}"
        )
        print(f"   cost: {json.dumps(res.get('cost'))}")
        if res.get("cost") and (sentence := worth_it(CostResults.model_validate(res["cost"]))):
            print(f"   {sentence}")
    if status.get("endpoint"):
        print(f"   endpoint: {status['endpoint']}")


async def main(path: Path, retention: float) -> int:
    run = load_yaml(path.read_text(encoding="utf-8"))
    ns, name = run["metadata"].get("namespace", "default"), run["metadata"]["name"]
    shards = (run["spec"].get("collection") or {}).get("shards", 1)
    workdir = Path(tempfile.mkdtemp(prefix="walkthrough-"))
    async with ApiServer() as api, kmock.Server(api) as server:
        declare_resources(api)
        api.namespaces.add(ns)
        cluster = Cluster(api, server, workdir)
        operator = Operator(
            write_kubeconfig(workdir / "kubeconfig.yaml", cluster.url), workdir / "operator.log"
        )
        cluster.operators.append(operator)
        await operator.start()
        try:
            await cluster.wait_for(lambda: any(e.verb == "watch" for e in api.audit), "the operator", 60)
            await cluster.apply_run(run)
            show("applied", await cluster.wait_phase(ns, name, "Collecting"))
            started = now()
            await cluster.finish_collection(ns, name, summaries(shards))
            show(
                f"{shards} collection pods reported, Job complete",
                await cluster.wait_phase(ns, name, "Training"),
            )
            await cluster.finish_training(ns, name, progress(), started=started)
            show("rank 0 reported, PyTorchJob succeeded", await cluster.wait_phase(ns, name, "Serving"))
            await cluster.roll_out(ns, f"{name}-serve")
            show("vLLM Deployment rolled out", await cluster.wait_phase(ns, name, "Evaluating"))
            await cluster.finish_evaluation(ns, name, results(retention))
            verdict = (
                "Succeeded"
                if retention >= (run["spec"].get("evaluation") or {}).get("minQualityRetention", 0.9)
                else "Failed"
            )
            show("evaluation pod reported, Job complete", await cluster.wait_phase(ns, name, verdict))
            await asyncio.sleep(1.0)
            print("\n== Events")
            for event in cluster.events(ns, name):
                print(f"   {event['type']:<8} {event['reason']:<20} {event.get('message', '')}")
        finally:
            await operator.stop()
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run", nargs="?", type=Path, default=EXAMPLES / "run.yaml")
    parser.add_argument("--retention", type=float, default=0.91, help="what the evaluation reports")
    args = parser.parse_args()
    sys.exit(asyncio.run(main(args.run, args.retention)))
