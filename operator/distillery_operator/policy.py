"""The platform's policy: what a tenant's run may override of the operator's defaults.

A run's spec can name its own images (``training.image``, ``serving.image``), its own placement
(``scheduling``) and extra vLLM flags (``serving.extraArgs``, ``teacher.selfHosted.extraArgs``). Whoever
may create a run is not necessarily trusted with those: an image runs with the namespace's Secrets and
GPUs, a toleration of every taint or a control-plane node selector reaches nodes a platform keeps to
itself, ``system-node-critical`` preempts other tenants, and ``--trust-remote-code`` executes code from a
model repository. The chart's ``policy.*`` values decide (they reach the operator as
:class:`~.settings.Settings`), and :func:`violations` checks a spec against them: a pure function the
planner calls before it creates any child (a violating run fails with reason ``PolicyViolation``), and
``distillery validate --policy values.yaml`` calls offline.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from distillery_trainer.api.spec import DistillationRunSpec

from .settings import Settings

Violation = tuple[str, str]  # (the spec field, what is wrong and the chart value that would allow it)

# Node labels and taints of control-plane nodes: no policy value lets a workload pod go there.
CONTROL_PLANE_KEYS = frozenset({"node-role.kubernetes.io/control-plane", "node-role.kubernetes.io/master"})
# PriorityClasses Kubernetes reserves for the cluster's own components.
SYSTEM_PRIORITY_PREFIX = "system-"


def violations(spec: DistillationRunSpec, settings: Settings) -> list[Violation]:
    """Every part of ``spec`` the platform's policy (``settings``) does not allow, with its field path."""
    out: list[Violation] = []
    out += _image(
        "spec.training.image", spec.training.image, settings.trainer_image, "workloads.trainerImage", settings
    )
    out += _image(
        "spec.serving.image", spec.serving.image, settings.vllm_image, "workloads.vllmImage", settings
    )
    out += _scheduling(spec, settings)
    out += vllm_args("spec.serving.extraArgs", spec.serving.extra_args, settings.vllm_args_allowlist)
    if spec.teacher.self_hosted is not None:
        out += vllm_args(
            "spec.teacher.selfHosted.extraArgs",
            spec.teacher.self_hosted.extra_args,
            settings.vllm_args_allowlist,
        )
    return out


def _image(
    path: str, image: str | None, default: str, default_key: str, settings: Settings
) -> list[Violation]:
    if image is None or image == default:
        return []
    prefixes = settings.allowed_image_prefixes
    if any(image.startswith(prefix) for prefix in prefixes):
        return []
    allowed = (
        f"images starting with {', '.join(repr(p) for p in prefixes)}"
        if prefixes
        else f"only the operator's default image ({default_key})"
    )
    return [
        (
            path,
            f"image {image!r} is not allowed by the platform's policy ({allowed}); remove the field, or have "
            "the platform add its registry to the chart's policy.allowedImagePrefixes",
        )
    ]


def _scheduling(spec: DistillationRunSpec, settings: Settings) -> list[Violation]:
    out: list[Violation] = []
    sched = spec.scheduling
    overrides = settings.allow_scheduling_overrides
    not_allowed = (
        "is not allowed by the platform's policy: remove it (the chart's workloads.{key} places every "
        "workload), or have the platform set policy.allowSchedulingOverrides: true in the chart"
    )
    for key, value in sched.node_selector.items():
        path = f"spec.scheduling.nodeSelector[{key}]"
        if key in CONTROL_PLANE_KEYS:
            out.append(
                (
                    path,
                    f"{key}={value} selects control-plane nodes; workloads never run there, whatever "
                    "policy.allowSchedulingOverrides says",
                )
            )
        elif not overrides:
            out.append((path, "a node selector " + not_allowed.format(key="nodeSelector")))
    for i, tol in enumerate(sched.tolerations):
        path = f"spec.scheduling.tolerations[{i}]"
        if tol.key is None and tol.operator == "Exists":
            out.append(
                (
                    path,
                    "a toleration without a key tolerates every taint (control-plane and NoExecute taints "
                    "included); name the taint's key, whatever policy.allowSchedulingOverrides says",
                )
            )
        elif tol.key in CONTROL_PLANE_KEYS:
            out.append(
                (
                    path,
                    f"tolerates the control-plane taint {tol.key}; workloads never run there, whatever "
                    "policy.allowSchedulingOverrides says",
                )
            )
        elif not overrides:
            out.append((path, "a toleration " + not_allowed.format(key="tolerations")))
    pc = sched.priority_class_name
    if pc is not None and pc != settings.priority_class_name and pc not in settings.allowed_priority_classes:
        listed = ", ".join(settings.allowed_priority_classes) or "none"
        if pc.startswith(SYSTEM_PRIORITY_PREFIX):
            why = f"{pc} is a class Kubernetes reserves for the cluster's own components"
        elif not overrides:
            why = "priority classes from the spec are not allowed"
        else:
            why = ""
        if why:
            out.append(
                (
                    "spec.scheduling.priorityClassName",
                    f"{why} (policy.allowedPriorityClasses: {listed}); use one of those, or have the "
                    "platform add it to the chart's policy.allowedPriorityClasses",
                )
            )
    return out


def flag_names(arg: str) -> Iterable[str]:
    """The flags in one command-line argument: each whitespace-separated word that starts with ``-``
    (``--foo=bar --trust-remote-code`` in one argument is two flags), up to its ``=``, with ``_`` as
    ``-`` (vLLM reads ``--trust_remote_code`` as ``--trust-remote-code``). Negative numbers are values."""
    for word in arg.split():
        if not word.startswith("-") or _number(word):
            continue
        yield word.split("=", 1)[0].replace("_", "-")


def _number(word: str) -> bool:
    try:
        float(word)
    except ValueError:
        return False
    return True


def vllm_args(path: str, args: Sequence[str], allowlist: Iterable[str]) -> list[Violation]:
    allowed = {a.replace("_", "-") for a in allowlist}
    out: list[Violation] = []
    for i, arg in enumerate(args):
        refused = [name for name in flag_names(arg) if name not in allowed]
        if refused:
            out.append(
                (
                    f"{path}[{i}]",
                    f"vLLM flag {', '.join(refused)} is not in the platform's allowlist "
                    "(the chart's policy.vllmArgsAllowlist); remove it, or have the platform add it there",
                )
            )
    return out


def settings_from_values(values: Mapping[str, Any], base: Settings | None = None) -> Settings:
    """The settings a chart installed with ``values`` (a values.yaml, possibly partial) gives the operator:
    its policy and the default images and priority class the policy compares with. For ``distillery
    validate --policy``; keep in step with the chart's ``distillery.operatorEnv``."""
    from dataclasses import replace

    base = base or Settings()
    policy = values.get("policy") or {}
    workloads = values.get("workloads") or {}
    changes: dict[str, Any] = {}
    if "allowedImagePrefixes" in policy:
        changes["allowed_image_prefixes"] = tuple(policy["allowedImagePrefixes"] or ())
    if "allowSchedulingOverrides" in policy:
        changes["allow_scheduling_overrides"] = bool(policy["allowSchedulingOverrides"])
    if "allowedPriorityClasses" in policy:
        changes["allowed_priority_classes"] = tuple(policy["allowedPriorityClasses"] or ())
    if "vllmArgsAllowlist" in policy:
        changes["vllm_args_allowlist"] = tuple(policy["vllmArgsAllowlist"] or ())
    for attr, key in (
        ("trainer_image", "trainerImage"),
        ("vllm_image", "vllmImage"),
        ("priority_class_name", "priorityClassName"),
    ):
        if workloads.get(key):
            changes[attr] = workloads[key]
    return replace(base, **changes)
