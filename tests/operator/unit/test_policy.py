"""The platform's policy (the chart's ``policy.*``): what a tenant's run may override. A run outside it
fails in the planner with reason ``PolicyViolation``, before any child exists, and the message names the
spec field and the chart value that would allow it."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import pytest
from distillery_operator.observe import Observed, RunView
from distillery_operator.planner import plan
from distillery_operator.policy import flag_names, settings_from_values, violations
from distillery_operator.settings import DEFAULT_VLLM_ARGS, Settings
from distillery_trainer.api.spec import DistillationRunSpec

from tests.support.builders import DELETE, make_run

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
STRICT = Settings()  # the chart's defaults: default images only, no scheduling overrides, safe vLLM flags
OPEN = replace(
    STRICT,
    allowed_image_prefixes=("registry.example/team-a/",),
    allow_scheduling_overrides=True,
    allowed_priority_classes=("batch-high",),
)


def spec(patch: dict[str, Any]) -> dict[str, Any]:
    return make_run("r", "ns").storage().spec(patch).obj()["spec"]


def planned(doc: dict[str, Any], settings: Settings) -> tuple[Any, dict[str, Any]]:
    view = RunView.of("r", "ns", "uid", 1, doc, {})
    out = plan(view, Observed({}, ()), T0, settings=settings)
    return out, out.status.to_dict()


SELF_HOSTED = {
    "teacher": {
        "endpoint": DELETE,
        "selfHosted": {"model": "Qwen/Qwen2.5-7B-Instruct", "extraArgs": ["--trust-remote-code"]},
    }
}

# (what, settings, spec patch, the field the message names, the chart value it names)
VIOLATIONS = [
    (
        "a trainer image from anywhere",
        STRICT,
        {"training": {"image": "docker.io/evil/trainer:1"}},
        "spec.training.image",
        "policy.allowedImagePrefixes",
    ),
    (
        "a vLLM image outside the allowed prefixes",
        OPEN,
        {"serving": {"image": "registry.example/team-b/vllm:1"}},
        "spec.serving.image",
        "policy.allowedImagePrefixes",
    ),
    (
        "a prefix that is only a string prefix of the registry",
        OPEN,
        {"training": {"image": "registry.example/team-ab/t:1"}},
        "spec.training.image",
        "policy.allowedImagePrefixes",
    ),
    (
        "a toleration without scheduling overrides",
        STRICT,
        {"scheduling": {"tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}]}},
        "spec.scheduling.tolerations[0]",
        "policy.allowSchedulingOverrides",
    ),
    (
        "a toleration of every taint, even with overrides",
        OPEN,
        {"scheduling": {"tolerations": [{"operator": "Exists"}]}},
        "spec.scheduling.tolerations[0]",
        "policy.allowSchedulingOverrides",
    ),
    (
        "a toleration of the control-plane taint, even with overrides",
        OPEN,
        {
            "scheduling": {
                "tolerations": [
                    {
                        "key": "node-role.kubernetes.io/control-plane",
                        "operator": "Exists",
                        "effect": "NoSchedule",
                    }
                ]
            }
        },
        "spec.scheduling.tolerations[0]",
        "policy.allowSchedulingOverrides",
    ),
    (
        "a node selector without scheduling overrides",
        STRICT,
        {"scheduling": {"nodeSelector": {"pool": "a100"}}},
        "spec.scheduling.nodeSelector[pool]",
        "policy.allowSchedulingOverrides",
    ),
    (
        "a control-plane node selector, even with overrides",
        OPEN,
        {"scheduling": {"nodeSelector": {"node-role.kubernetes.io/control-plane": ""}}},
        "spec.scheduling.nodeSelector[node-role.kubernetes.io/control-plane]",
        "policy.allowSchedulingOverrides",
    ),
    (
        "system-node-critical, even with overrides",
        OPEN,
        {"scheduling": {"priorityClassName": "system-node-critical"}},
        "spec.scheduling.priorityClassName",
        "policy.allowedPriorityClasses",
    ),
    (
        "an unlisted priority class without overrides",
        STRICT,
        {"scheduling": {"priorityClassName": "batch-high"}},
        "spec.scheduling.priorityClassName",
        "policy.allowedPriorityClasses",
    ),
    (
        "--trust-remote-code",
        OPEN,
        {"serving": {"extraArgs": ["--enforce-eager", "--trust-remote-code"]}},
        "spec.serving.extraArgs[1]",
        "policy.vllmArgsAllowlist",
    ),
    (
        "--trust-remote-code=true",
        STRICT,
        {"serving": {"extraArgs": ["--trust-remote-code=true"]}},
        "spec.serving.extraArgs[0]",
        "policy.vllmArgsAllowlist",
    ),
    (
        "a flag hidden after another in one argument",
        STRICT,
        {"serving": {"extraArgs": ["--max-num-seqs=8 --trust-remote-code"]}},
        "spec.serving.extraArgs[0]",
        "policy.vllmArgsAllowlist",
    ),
    (
        "--trust_remote_code, which vLLM reads as --trust-remote-code",
        STRICT,
        {"serving": {"extraArgs": ["--trust_remote_code"]}},
        "spec.serving.extraArgs[0]",
        "policy.vllmArgsAllowlist",
    ),
    (
        "an abbreviation argparse would expand",
        STRICT,
        {"serving": {"extraArgs": ["--trust-remote"]}},
        "spec.serving.extraArgs[0]",
        "policy.vllmArgsAllowlist",
    ),
    (
        "the self-hosted teacher's flags",
        STRICT,
        SELF_HOSTED,
        "spec.teacher.selfHosted.extraArgs[0]",
        "policy.vllmArgsAllowlist",
    ),
]


@pytest.mark.parametrize(
    ("settings", "patch", "field", "chart_value"),
    [v[1:] for v in VIOLATIONS],
    ids=[v[0] for v in VIOLATIONS],
)
def test_a_run_outside_the_policy_fails_before_any_child_naming_field_and_chart_value(
    settings: Settings, patch: dict[str, Any], field: str, chart_value: str
) -> None:
    out, status = planned(spec(patch), settings)
    assert out.apply == [] and out.delete == []
    assert status["phase"] == "Failed"
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "PolicyViolation"
    assert f"{field}: " in status["message"] and chart_value in status["message"], status["message"]
    assert [(e.type, e.reason) for e in out.events] == [("Warning", "PolicyViolation")]
    assert field in out.events[0].message


ALLOWED = [
    ("nothing overridden", STRICT, {}),
    (
        "the operator's own images named explicitly",
        STRICT,
        {"training": {"image": STRICT.trainer_image}, "serving": {"image": STRICT.vllm_image}},
    ),
    (
        "images under an allowed prefix",
        OPEN,
        {
            "training": {"image": "registry.example/team-a/trainer:1"},
            "serving": {"image": "registry.example/team-a/vllm:1"},
        },
    ),
    (
        "placement with overrides allowed",
        OPEN,
        {
            "scheduling": {
                "nodeSelector": {"pool": "a100"},
                "tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}],
                "priorityClassName": "team-low",
            }
        },
    ),
    (
        "a listed priority class without overrides",
        replace(STRICT, allowed_priority_classes=("batch-high",)),
        {"scheduling": {"priorityClassName": "batch-high"}},
    ),
    (
        "the platform's own default priority class",
        replace(STRICT, priority_class_name="batch"),
        {"scheduling": {"priorityClassName": "batch"}},
    ),
    ("a Kueue queue (LocalQueues are per namespace)", STRICT, {"scheduling": {"queueName": "team-a"}}),
    (
        "safe vLLM flags, with values and negative numbers",
        STRICT,
        {
            "serving": {
                "extraArgs": [
                    "--max-num-seqs",
                    "64",
                    "--enable-prefix-caching",
                    "--max_num_batched_tokens=4096",
                    "--enforce-eager",
                    "--seed",
                    "-1",
                ]
            }
        },
    ),
    (
        "--trust-remote-code when the platform lists it",
        replace(STRICT, vllm_args_allowlist=("--trust-remote-code",)),
        {"serving": {"extraArgs": ["--trust-remote-code"]}},
    ),
]


@pytest.mark.parametrize(("settings", "patch"), [a[1:] for a in ALLOWED], ids=[a[0] for a in ALLOWED])
def test_a_run_inside_the_policy_starts(settings: Settings, patch: dict[str, Any]) -> None:
    out, status = planned(spec(patch), settings)
    assert status["phase"] != "Failed", status.get("message")
    assert any(d.kind == "Job" for d in out.apply)


def test_every_violation_is_reported_at_once() -> None:
    doc = DistillationRunSpec.model_validate(
        spec(
            {
                "training": {"image": "evil/t:1"},
                "serving": {"image": "evil/v:1", "extraArgs": ["--trust-remote-code"]},
                "scheduling": {"nodeSelector": {"a": "b"}, "priorityClassName": "system-cluster-critical"},
            }
        )
    )
    assert [p for p, _ in violations(doc, STRICT)] == [
        "spec.training.image",
        "spec.serving.image",
        "spec.scheduling.nodeSelector[a]",
        "spec.scheduling.priorityClassName",
        "spec.serving.extraArgs[0]",
    ]


def test_flag_names_see_every_flag_in_an_argument() -> None:
    assert list(flag_names("--foo=bar --trust-remote-code")) == ["--foo", "--trust-remote-code"]
    assert list(flag_names("--trust_remote_code=1")) == ["--trust-remote-code"]
    assert list(flag_names("-1")) == [] and list(flag_names("64")) == []
    assert list(flag_names("-tp")) == ["-tp"]


def test_the_default_allowlist_never_holds_remote_code() -> None:
    assert "--trust-remote-code" not in DEFAULT_VLLM_ARGS
    assert not [f for f in DEFAULT_VLLM_ARGS if "remote" in f or "config" in f or "chat-template" in f]


def test_policy_settings_come_from_the_environment_the_chart_sets() -> None:
    s = Settings.from_env(
        {
            "DISTILLERY_ALLOWED_IMAGE_PREFIXES": '["registry.example/team-a/"]',
            "DISTILLERY_ALLOW_SCHEDULING_OVERRIDES": "true",
            "DISTILLERY_ALLOWED_PRIORITY_CLASSES": '["batch-high","batch-low"]',
            "DISTILLERY_VLLM_ARGS_ALLOWLIST": "[]",
            "DISTILLERY_LIVE_PROGRESS": "false",
            "DISTILLERY_RUN_AS_USER": "1000650000",
        }
    )
    assert s.allowed_image_prefixes == ("registry.example/team-a/",)
    assert s.allow_scheduling_overrides is True
    assert s.allowed_priority_classes == ("batch-high", "batch-low")
    assert s.vllm_args_allowlist == ()  # an empty list allows no flag at all
    assert s.live_progress is False and s.run_as_user == 1000650000
    assert Settings.from_env({}).vllm_args_allowlist == DEFAULT_VLLM_ARGS
    with pytest.raises(ValueError, match="DISTILLERY_ALLOW_SCHEDULING_OVERRIDES"):
        Settings.from_env({"DISTILLERY_ALLOW_SCHEDULING_OVERRIDES": "perhaps"})


def test_settings_from_chart_values_mirror_the_chart() -> None:
    s = settings_from_values(
        {
            "policy": {
                "allowedImagePrefixes": ["r/"],
                "allowSchedulingOverrides": True,
                "vllmArgsAllowlist": [],
            },
            "workloads": {"trainerImage": "r2/trainer:1", "priorityClassName": "batch"},
        }
    )
    assert (s.allowed_image_prefixes, s.allow_scheduling_overrides, s.vllm_args_allowlist) == (
        ("r/",),
        True,
        (),
    )
    assert s.trainer_image == "r2/trainer:1" and s.priority_class_name == "batch"
    assert settings_from_values({}) == Settings()
