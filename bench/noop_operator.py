"""The baseline for the operator benchmark: a kopf operator that watches DistillationRuns and does nothing.

Same kopf, same login (kopf's own kubeconfig parser), same resource; only the work is missing. Run it with
``python -m kopf run --standalone -A bench/noop_operator.py``.
"""

from __future__ import annotations

from typing import Any

import kopf


@kopf.on.login()
def login(settings: kopf.OperatorSettings, **_: Any) -> kopf.ConnectionInfo | None:
    info: kopf.ConnectionInfo | None = kopf.login_with_service_account(settings=settings)
    return info or kopf.login_with_kubeconfig(settings=settings)


@kopf.on.event("distillery.dev", "v1alpha1", "distillationruns")
async def seen(**_: Any) -> None:
    return None
