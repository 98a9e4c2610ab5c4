"""The Helm chart, rendered by the real ``helm``: lint, schema, every object valid for Kubernetes 1.30+,
the operator's pod locked down, RBAC that never touches Secrets, the values reaching the operator, and
the optional metrics Service and ServiceMonitor."""

from __future__ import annotations

import json
import tarfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from distillery_operator.builders.common import Run
from distillery_operator.builders.serve import serve_deployment
from distillery_operator.policy import settings_from_values
from distillery_operator.settings import DEFAULT_VLLM_ARGS, Settings
from distillery_trainer.api.spec import DistillationRunSpec

from tests.conftest import REPO
from tests.support.builders import make_run

from .helm import CHART, NAMESPACE, RELEASE, Rendered, Tools, render, template, walk
from .scenarios import EVERYTHING, GPU_KUEUE, NAMESPACED, SCENARIOS

# The Kubernetes versions every rendered object must be valid for: the oldest the chart supports
# (Chart.yaml kubeVersion) and the newest kubernetes-validate knows.
K8S_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
# The stage pods' resources, as the chart's defaults render them.
RESOURCE_ENV = {
    "DISTILLERY_COLLECTION_RESOURCES": '{"limits":{"cpu":"","memory":"1Gi"},"requests":{"cpu":"500m","memory":"1Gi"}}',
    "DISTILLERY_EVALUATION_RESOURCES": '{"limits":{"cpu":"","memory":"2Gi"},"requests":{"cpu":"1","memory":"2Gi"}}',
    "DISTILLERY_TRAINING_RESOURCES": '{"limits":{"cpu":"","memory":""},"requests":{"cpu":"4","memory":"32Gi"}}',
    "DISTILLERY_VLLM_RESOURCES": '{"limits":{"cpu":"","memory":""},"requests":{"cpu":"2","memory":"16Gi"}}',
    "DISTILLERY_SHM_SIZE": "8Gi",
}
# Custom resources of other projects the chart may render: kubernetes-validate has no schema for them.
FOREIGN_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}


@pytest.fixture(scope="module", params=list(SCENARIOS))
def scenario(
    request: pytest.FixtureRequest, k8s_tools: Tools, tmp_path_factory: pytest.TempPathFactory
) -> Rendered:
    return render(k8s_tools, tmp_path_factory.mktemp("values"), SCENARIOS[request.param], crds=True)


def rendered(k8s_tools: Tools, tmp_path: Path, values: dict[str, Any] | None = None) -> Rendered:
    return render(k8s_tools, tmp_path, values)


# ---------------------------------------------------------------------------------------------- helm


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_helm_lint_strict_is_clean(k8s_tools: Tools, tmp_path: Path, name: str) -> None:
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump(SCENARIOS[name]), encoding="utf-8")
    out = k8s_tools.run(k8s_tools.helm, "lint", "--strict", CHART, "-f", values)
    lines = (out.stdout + out.stderr).splitlines()
    assert not [ln for ln in lines if "[WARNING]" in ln or "[ERROR]" in ln], out.stdout + out.stderr
    assert "0 chart(s) failed" in out.stdout


def test_every_rendered_object_is_valid_kubernetes_strictly(scenario: Rendered) -> None:
    kinds = {o["kind"] for o in scenario.objects}
    assert {"CustomResourceDefinition", "ServiceAccount", "Deployment", "ClusterRole"} <= kinds
    for obj in scenario.objects:
        if (obj["apiVersion"], obj["kind"]) in FOREIGN_KINDS:
            # Skipped, explicitly: no schema to check it against (its test below checks its fields).
            with pytest.raises(kubernetes_validate.SchemaNotFoundError):
                kubernetes_validate.validate(obj, K8S_VERSIONS[0], strict=True)
            continue
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                raise AssertionError(
                    f"{obj['kind']} {obj['metadata']['name']} (k8s {version}): {exc}"
                ) from exc


def test_the_chart_crd_is_the_generated_file_one_source(k8s_tools: Tools, tmp_path: Path) -> None:
    """charts/distillery/crds is a link to crds/, and `helm package` ships the file's bytes."""
    link = CHART / "crds"
    assert link.is_symlink() and link.resolve() == (REPO / "crds").resolve()
    k8s_tools.run(k8s_tools.helm, "package", CHART, "--destination", tmp_path)
    (package,) = tmp_path.glob("distillery-*.tgz")
    with tarfile.open(package) as tar:
        member = tar.extractfile("distillery/crds/distillery.dev_distillationruns.yaml")
        assert member is not None
        packaged = member.read()
    assert packaged == (REPO / "crds" / "distillery.dev_distillationruns.yaml").read_bytes()


def test_values_schema_rejects_unknown_keys_and_bad_values(k8s_tools: Tools, tmp_path: Path) -> None:
    for values, expected in (
        ({"rbac": {"scop": "cluster"}}, "scop"),
        ({"workloads": {"kueue": {"queue": "q"}}}, "queue"),
        ({"typo": 1}, "typo"),
        ({"rbac": {"scope": "everywhere"}}, "scope"),
        ({"operator": {"logLevel": "loud"}}, "logLevel"),
        ({"rbac": {"watchNamespaces": ["Not_A_Namespace"]}}, "watchNamespaces"),
        ({"workloads": {"storageClassName": "Fast_SSD"}}, "storageClassName"),
        ({"metrics": {"enable": True}}, "enable"),
        ({"metrics": {"serviceMonitor": {"interval": "30 seconds"}}}, "interval"),
        ({"metrics": {"port": 80}}, "port"),
        ({"workloads": {"resources": {"vllm": {"requests": {"gpu": "1"}}}}}, "gpu"),
        ({"workloads": {"resources": {"evaluation": {"limits": {"memory": "lots"}}}}}, "memory"),
        ({"workloads": {"shmSize": "unbounded"}}, "shmSize"),
    ):
        path = tmp_path / "bad.yaml"
        path.write_text(yaml.safe_dump(values), encoding="utf-8")
        out = k8s_tools.run(k8s_tools.helm, "template", "x", CHART, "-f", path, check=False)
        assert out.returncode != 0 and expected in out.stderr, (values, out.stderr)


def _schema_node(schema: dict[str, Any], dotted: str) -> dict[str, Any] | None:
    node: dict[str, Any] = schema
    for part in dotted.split("."):
        props = node.get("properties")
        if props is None or part not in props:
            return None
        node = props[part]
    return node


def test_values_schema_describes_every_key_with_its_default() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text(encoding="utf-8"))
    values = yaml.safe_load((CHART / "values.yaml").read_text(encoding="utf-8"))
    checked = 0
    for dotted, value in walk(values):
        parent = dotted.rpartition(".")[0]
        parent_node = _schema_node(schema, parent) if parent else schema
        if parent_node is not None and "properties" not in parent_node:
            continue  # inside a free-form map (resources.requests, nodeSelector): its parent has the default
        node = _schema_node(schema, dotted)
        assert node is not None, f"values.yaml key {dotted} is not in values.schema.json"
        assert node.get("description"), f"{dotted}: no description in values.schema.json"
        assert "default" in node and node["default"] == value, (
            f"{dotted}: values.schema.json default {node.get('default')!r} != values.yaml {value!r}"
        )
        checked += 1
    assert checked >= 30

    def closed(node: dict[str, Any], where: str) -> None:
        if "properties" in node:
            assert node.get("additionalProperties") is False, f"{where}: additionalProperties must be false"
            for key, sub in node["properties"].items():
                closed(sub, f"{where}.{key}")
        for sub in (node.get("items"),):
            if isinstance(sub, dict):
                closed(sub, f"{where}[]")

    closed(schema, "values")
    # And no key the schema describes is missing from values.yaml.
    declared = {
        d.replace("properties.", "")
        for d, n in walk(schema)
        if isinstance(n, dict) and "description" in n and "default" in n and ".items" not in d
    }
    present = {d for d, _ in walk(values)}
    assert declared <= present, f"in the schema but not in values.yaml: {sorted(declared - present)}"


# ---------------------------------------------------------------------------------------------- the operator's pod


def test_operator_deployment_is_one_locked_down_replica_probed_by_kopf(
    k8s_tools: Tools, tmp_path: Path
) -> None:
    out = rendered(k8s_tools, tmp_path)
    dep = out.one("Deployment")
    assert dep["metadata"]["namespace"] == NAMESPACE
    assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"] == {"type": "Recreate"}
    pod = dep["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == out.one("ServiceAccount")["metadata"]["name"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001  # Dockerfile.operator's USER
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    (container,) = pod["containers"]
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False and sc["privileged"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]} and sc["runAsNonRoot"] is True
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
    assert {m["mountPath"] for m in container["volumeMounts"]} == {"/tmp"}
    # kopf's health endpoint: the --liveness URL's port and path are what the probes ask.
    (port,) = container["ports"]
    assert (port["name"], port["containerPort"]) == ("probes", 8080)
    assert "--liveness=http://0.0.0.0:8080/healthz" in container["args"]
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "probes"}, probe
    assert container["image"] == "ghcr.io/distillery-dev/distillery-operator:0.1.0"


def test_scope_and_log_level_become_the_operator_flags(k8s_tools: Tools, tmp_path: Path) -> None:
    args = rendered(k8s_tools, tmp_path).operator_container()["args"]
    assert args == ["--all-namespaces", "--liveness=http://0.0.0.0:8080/healthz", "--verbose"]
    args = rendered(k8s_tools, tmp_path, EVERYTHING).operator_container()["args"]
    assert args == [
        "--namespace=team-a",
        "--namespace=team-b",
        "--liveness=http://0.0.0.0:9000/healthz",
        "--metrics=http://0.0.0.0:9001/metrics",
        "--debug",
    ]
    quiet = {"rbac": {"scope": "namespaced"}, "operator": {"logLevel": "warning"}}
    args = rendered(k8s_tools, tmp_path, quiet).operator_container()["args"]
    assert args == [f"--namespace={NAMESPACE}", "--liveness=http://0.0.0.0:8080/healthz"]


@pytest.fixture
def restored_logging() -> Any:
    """The levels `distillery operator` sets, put back afterwards (they are process-wide)."""
    import logging

    names = ("", "distillery", "distillery.operator", "kopf", "kopf.objects")
    saved = {name: logging.getLogger(name).level for name in names}
    yield
    for name, level in saved.items():
        logging.getLogger(name).setLevel(level)


@pytest.mark.parametrize(
    ("log_level", "operator", "kopf_objects"),
    [("warning", "WARNING", "WARNING"), ("info", "INFO", "WARNING"), ("debug", "DEBUG", "DEBUG")],
)
def test_the_log_level_applies_to_the_operators_own_loggers(
    k8s_tools: Tools,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    restored_logging: None,
    log_level: str,
    operator: str,
    kopf_objects: str,
) -> None:
    """`operator.logLevel: warning` left the operator's own lines (logger distillery.operator) at INFO.
    The chart's arguments go through the real `distillery operator` entry (kopf.run stubbed out)."""
    import logging

    import kopf
    from distillery_operator.cli import main

    args = rendered(k8s_tools, tmp_path, {"operator": {"logLevel": log_level}}).operator_container()["args"]
    ran: list[dict[str, Any]] = []
    monkeypatch.setattr(kopf, "run", lambda **kwargs: ran.append(kwargs))
    assert main(["operator", *args]) == 0 and ran
    for name in ("distillery.operator", "kopf", "kopf.activities"):
        got = logging.getLevelName(logging.getLogger(name).getEffectiveLevel())
        assert got == operator, (log_level, name, got)
    # One "Handler ... succeeded" line per watch event is noise below debug.
    got = logging.getLevelName(logging.getLogger("kopf.objects").getEffectiveLevel())
    assert got == kopf_objects, (log_level, "kopf.objects", got)


# The numbers are always passed: 0 means "none" to the operator, not "your default".
DEADLINES = {
    "DISTILLERY_COLLECT_DEADLINE_SECONDS": "86400",
    "DISTILLERY_TRAIN_DEADLINE_SECONDS": "604800",
    "DISTILLERY_EVALUATE_DEADLINE_SECONDS": "21600",
    "DISTILLERY_STALL_TIMEOUT_SECONDS": "900",
}


def test_workload_defaults_reach_the_operator_as_its_settings(k8s_tools: Tools, tmp_path: Path) -> None:
    # Defaults: only what has a value; the operator's own defaults cover the rest. The pods' resources
    # are spelled out in the chart (what a platform team tunes), the same as the operator's built-ins.
    defaults = rendered(k8s_tools, tmp_path).env()
    assert defaults == {
        "DISTILLERY_GPU_RESOURCE": "nvidia.com/gpu",
        "DISTILLERY_TRAINING_RUNTIME": "torch-distributed",
        "DISTILLERY_IMAGE_PULL_POLICY": "IfNotPresent",
        **DEADLINES,
        **RESOURCE_ENV,
        "DISTILLERY_RUN_AS_USER": "10001",
        **DEFAULT_POLICY_ENV,
    }
    built_in = Settings()
    from_chart = Settings.from_env(defaults)
    for attr in (
        "collection_resources",
        "evaluation_resources",
        "training_resources",
        "vllm_resources",
        "shm_size",
    ):
        assert getattr(from_chart, attr) == getattr(built_in, attr), attr
    env = rendered(k8s_tools, tmp_path, GPU_KUEUE).env()
    for name in RESOURCE_ENV:
        env.pop(name)
    assert env == {
        "DISTILLERY_COLLECT_DEADLINE_SECONDS": "43200",
        "DISTILLERY_TRAIN_DEADLINE_SECONDS": "259200",
        "DISTILLERY_EVALUATE_DEADLINE_SECONDS": "7200",
        "DISTILLERY_STALL_TIMEOUT_SECONDS": "1800",
        "DISTILLERY_ALLOWED_IMAGE_PREFIXES": '["registry.example/"]',
        "DISTILLERY_ALLOW_SCHEDULING_OVERRIDES": "true",
        "DISTILLERY_ALLOWED_PRIORITY_CLASSES": '["batch-high"]',
        "DISTILLERY_VLLM_ARGS_ALLOWLIST": '["--enforce-eager","--max-num-seqs"]',
        "DISTILLERY_RUN_AS_USER": "2000",
        "DISTILLERY_TRAINER_IMAGE": "registry.example/distillery-trainer:0.1.0",
        "DISTILLERY_VLLM_IMAGE": "registry.example/vllm-openai:v0.32.0",
        "DISTILLERY_IMAGE_PULL_POLICY": "Always",
        "DISTILLERY_GPU_RESOURCE": "amd.com/gpu",
        "DISTILLERY_TRAINING_RUNTIME": "torch-tuned",
        "DISTILLERY_NODE_SELECTOR": '{"node.kubernetes.io/instance-type":"p5.48xlarge"}',
        "DISTILLERY_TOLERATIONS": '[{"effect":"NoSchedule","key":"nvidia.com/gpu","operator":"Exists"}]',
        "DISTILLERY_PRIORITY_CLASS": "batch-high",
        "DISTILLERY_QUEUE_NAME": "team-a-gpus",
        "DISTILLERY_STORAGE_CLASS": "fast-rwx",
    }
    assert json.loads(env["DISTILLERY_TOLERATIONS"]) == GPU_KUEUE["workloads"]["tolerations"]
    everything = rendered(k8s_tools, tmp_path, EVERYTHING).env()
    assert (
        everything["HTTPS_PROXY"] == "http://proxy:3128"
        and everything["DISTILLERY_QUEUE_NAME"] == "team-a-gpus"
    )
    timings = {
        "workloads": {
            "deadlines": {"collectSeconds": 3600, "trainSeconds": 1000000, "evaluateSeconds": 0},
            "stallTimeoutSeconds": 0,
        }
    }
    env = rendered(k8s_tools, tmp_path, timings).env()
    assert Settings.from_env(env).stall_timeout_seconds == 0  # off, not the operator's 900
    assert (env["DISTILLERY_COLLECT_DEADLINE_SECONDS"], env["DISTILLERY_TRAIN_DEADLINE_SECONDS"]) == (
        "3600",
        "1000000",
    )
    assert Settings.from_env(env).evaluate_deadline_seconds == 0


def test_pod_resources_reach_the_operator_and_its_pods(k8s_tools: Tools, tmp_path: Path) -> None:
    values = {
        "workloads": {
            "resources": {
                "evaluation": {"requests": {"cpu": 2, "memory": "8Gi"}, "limits": {"memory": "12Gi"}},
                "vllm": {"requests": {"cpu": "8", "memory": "64Gi"}, "limits": {"memory": "96Gi"}},
            },
            "shmSize": "32Gi",
        }
    }
    settings = Settings.from_env(rendered(k8s_tools, tmp_path, values).env())
    assert settings.evaluation_resources == {
        "requests": {"cpu": "2", "memory": "8Gi"},  # `cpu: 2` (a number in YAML) is read as a quantity
        "limits": {"memory": "12Gi"},
    }
    assert settings.collection_resources == Settings().collection_resources  # the untouched default
    assert settings.shm_size == "32Gi"
    run = Run("r", "team-a", "u", DistillationRunSpec.model_validate(make_run().storage().obj()["spec"]))
    pod = serve_deployment(run, settings, "i", replicas=1)["spec"]["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"] == {"memory": "96Gi", "nvidia.com/gpu": "1"}
    assert next(v for v in pod["volumes"] if v["name"] == "shm")["emptyDir"]["sizeLimit"] == "32Gi"


DEFAULT_POLICY_ENV = {
    "DISTILLERY_ALLOWED_IMAGE_PREFIXES": "[]",
    "DISTILLERY_ALLOW_SCHEDULING_OVERRIDES": "false",
    "DISTILLERY_ALLOWED_PRIORITY_CLASSES": "[]",
    "DISTILLERY_VLLM_ARGS_ALLOWLIST": json.dumps(list(DEFAULT_VLLM_ARGS), separators=(",", ":")),
}


def test_the_policy_values_become_the_operators_policy(k8s_tools: Tools, tmp_path: Path) -> None:
    # The chart's defaults are the operator's: the strict policy.
    default = Settings.from_env(rendered(k8s_tools, tmp_path).env())
    assert default == Settings()
    policy = {
        "allowedImagePrefixes": ["registry.example/team-a/"],
        "allowSchedulingOverrides": True,
        "allowedPriorityClasses": ["batch-high"],
        "vllmArgsAllowlist": ["--enforce-eager", "--trust-remote-code"],
    }
    values = {"policy": policy, "workloads": {"runAsUser": 1000650000}, "operator": {"liveProgress": False}}
    s = full = Settings.from_env(rendered(k8s_tools, tmp_path, values).env())
    assert s.allowed_image_prefixes == ("registry.example/team-a/",)
    assert s.allow_scheduling_overrides is True and s.allowed_priority_classes == ("batch-high",)
    assert s.vllm_args_allowlist == ("--enforce-eager", "--trust-remote-code")
    assert s.run_as_user == 1000650000 and s.live_progress is False
    # An empty allowlist reaches the operator as "nothing", not as "the default list".
    s = Settings.from_env(rendered(k8s_tools, tmp_path, {"policy": {"vllmArgsAllowlist": []}}).env())
    assert s.vllm_args_allowlist == ()
    # `distillery validate --policy values.yaml` reads the same values as the operator's settings.
    assert settings_from_values(values) == replace(full, run_as_user=10001, live_progress=True)


def test_run_as_user_null_leaves_the_uid_to_the_platform(k8s_tools: Tools, tmp_path: Path) -> None:
    env = rendered(k8s_tools, tmp_path, {"workloads": {"runAsUser": None}}).env()
    assert env["DISTILLERY_RUN_AS_USER"] == "none" and Settings.from_env(env).run_as_user is None


def test_live_progress_off_drops_the_pods_log_grant(k8s_tools: Tools, tmp_path: Path) -> None:
    def grants(out: Rendered) -> set[str]:
        return {
            r
            for role in out.of_kind("ClusterRole") + out.of_kind("Role")
            for rule in _rules(role)
            for r in rule["resources"]
        }

    assert "pods/log" in grants(rendered(k8s_tools, tmp_path))
    off = {"operator": {"liveProgress": False}}
    for values in (off, {**off, **NAMESPACED}):
        out = rendered(k8s_tools, tmp_path, values)
        assert "pods/log" not in grants(out) and "pods" in grants(out)
        assert out.env()["DISTILLERY_LIVE_PROGRESS"] == "false"


def test_children_with_block_owner_deletion_may_be_created_under_openshift(
    k8s_tools: Tools, tmp_path: Path
) -> None:
    """OwnerReferencesPermissionEnforcement: an owner reference with blockOwnerDeletion needs update on
    the owner's finalizers, in both scopes."""
    for values in ({}, NAMESPACED):
        out = rendered(k8s_tools, tmp_path, values)
        roles = out.of_kind("Role") or out.of_kind("ClusterRole")
        for role in roles:
            assert {
                "apiGroups": ["distillery.dev"],
                "resources": ["distillationruns/finalizers"],
                "verbs": ["update"],
            } in _rules(role)


def test_operator_pod_placement_is_its_own_not_the_workloads(k8s_tools: Tools, tmp_path: Path) -> None:
    out = rendered(k8s_tools, tmp_path, EVERYTHING)
    pod = out.one("Deployment")["spec"]["template"]
    assert pod["spec"]["nodeSelector"] == {"kubernetes.io/os": "linux"}
    assert pod["spec"]["tolerations"] == [{"key": "control-plane", "operator": "Exists"}]
    assert pod["spec"]["priorityClassName"] == "system-cluster-critical"
    assert pod["spec"]["imagePullSecrets"] == [{"name": "registry"}]
    assert pod["metadata"]["labels"]["team"] == "platform"
    assert pod["metadata"]["annotations"] == {"prometheus.io/scrape": "false"}
    assert out.operator_container()["image"] == "registry.example/distillery-operator:0.1.0-rc1"
    assert out.one("ServiceAccount")["metadata"]["name"] == "distillery"


def test_an_existing_service_account_must_be_named(k8s_tools: Tools, tmp_path: Path) -> None:
    path = tmp_path / "v.yaml"
    path.write_text(yaml.safe_dump({"serviceAccount": {"create": False}}), encoding="utf-8")
    out = k8s_tools.run(k8s_tools.helm, "template", "x", CHART, "-f", path, check=False)
    assert out.returncode != 0 and "serviceAccount.name is required" in out.stderr
    out2 = rendered(k8s_tools, tmp_path, {"serviceAccount": {"create": False, "name": "platform-sa"}})
    assert not out2.of_kind("ServiceAccount")
    assert out2.one("Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == "platform-sa"
    assert out2.one("ClusterRoleBinding")["subjects"][0]["name"] == "platform-sa"


# ---------------------------------------------------------------------------------------------- RBAC


def _rules(obj: dict[str, Any]) -> list[dict[str, Any]]:
    return list(obj.get("rules") or ())


def test_rbac_never_grants_secrets_or_wildcards(scenario: Rendered) -> None:
    for obj in scenario.of_kind("ClusterRole") + scenario.of_kind("Role"):
        for rule in _rules(obj):
            assert "secrets" not in rule["resources"], obj["metadata"]["name"]
            for field in ("apiGroups", "resources", "verbs"):
                assert "*" not in rule.get(field, ()), (obj["kind"], rule)
            assert not {"escalate", "bind", "impersonate", "deletecollection"} & set(rule["verbs"])
            if "update" in rule["verbs"]:  # only what OwnerReferencesPermissionEnforcement asks for
                assert rule["resources"] == ["distillationruns/finalizers"] and rule["verbs"] == ["update"]
            assert "nonResourceURLs" not in rule


def test_cluster_mode_binds_one_cluster_role(k8s_tools: Tools, tmp_path: Path) -> None:
    out = rendered(k8s_tools, tmp_path)
    assert not out.of_kind("Role") and not out.of_kind("RoleBinding")
    role, binding = out.one("ClusterRole"), out.one("ClusterRoleBinding")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": role["metadata"]["name"],
    }
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "distillery", "namespace": NAMESPACE}]
    resources = {r for rule in _rules(role) for r in rule["resources"]}
    assert "namespaces" not in resources  # a cluster-wide kopf does not scan namespaces
    assert {
        "distillationruns",
        "distillationruns/status",
        "pods",
        "events",
        "customresourcedefinitions",
    } <= resources


def test_namespaced_mode_grants_roles_per_namespace_and_only_cluster_reads(
    k8s_tools: Tools, tmp_path: Path
) -> None:
    cluster = rendered(k8s_tools, tmp_path).one("ClusterRole")
    out = rendered(k8s_tools, tmp_path, NAMESPACED)
    roles = {r["metadata"]["namespace"]: r for r in out.of_kind("Role")}
    bindings = {b["metadata"]["namespace"]: b for b in out.of_kind("RoleBinding")}
    assert set(roles) == set(bindings) == {"team-a", "team-b"}
    for ns, binding in bindings.items():
        assert (
            binding["roleRef"]["kind"] == "Role"
            and binding["roleRef"]["name"] == roles[ns]["metadata"]["name"]
        )
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": "distillery", "namespace": NAMESPACE}
        ]
    # The same namespaced rules as the cluster-wide role: one definition in _helpers.tpl.
    cluster_scoped = {"customresourcedefinitions", "namespaces", "storageclasses", "clustertrainingruntimes"}
    namespaced_part = [r for r in _rules(cluster) if not set(r["resources"]) & cluster_scoped]
    for role in roles.values():
        assert _rules(role) == namespaced_part
    # What is left cluster-wide only reads namespaces (which exist), CRDs (Kubeflow installed later),
    # StorageClasses (how a pending claim binds) and ClusterTrainingRuntimes (whether a TrainJob's exists).
    reads = out.one("ClusterRole")
    for rule in _rules(reads):
        assert set(rule["resources"]) <= cluster_scoped and set(rule["verbs"]) <= {"get", "list", "watch"}
    assert {r for rule in _rules(reads) for r in rule["resources"]} == cluster_scoped


# Kinds the API server keeps outside namespaces that a chart might render; anything rendered without a
# metadata.namespace counts as cluster-scoped too.
CLUSTER_KINDS = {
    "ClusterRole",
    "ClusterRoleBinding",
    "Namespace",
    "CustomResourceDefinition",
    "PriorityClass",
    "StorageClass",
    "PersistentVolume",
    "ValidatingWebhookConfiguration",
    "MutatingWebhookConfiguration",
    "ValidatingAdmissionPolicy",
    "ValidatingAdmissionPolicyBinding",
    "APIService",
}


def _cluster_scoped(objects: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    out = {}
    for obj in objects:
        if obj["kind"] in CLUSTER_KINDS or "namespace" not in obj["metadata"]:
            key = (obj["kind"], obj["metadata"]["name"])
            assert key not in out, f"{key} rendered twice by one release"
            out[key] = obj
    return out


@pytest.mark.parametrize(
    "values",
    [
        pytest.param({"rbac": {"scope": "namespaced"}}, id="namespaced-own-namespace"),
        pytest.param({"rbac": {"scope": "namespaced", "createNamespaces": True}}, id="namespaced-created"),
        pytest.param({}, id="cluster"),
        pytest.param({k: v for k, v in EVERYTHING.items() if k != "rbac"}, id="everything"),
    ],
)
def test_two_releases_in_two_namespaces_share_no_cluster_scoped_name(
    k8s_tools: Tools, tmp_path: Path, values: dict[str, Any]
) -> None:
    """One operator per business unit (docs/multi-tenancy.md): `helm install distillery -n bu-1` and
    `-n bu-2`, the same release name. Two releases owning one ClusterRoleBinding would overwrite each
    other's subject (Helm refuses the second install; two Argo CD Applications fight over it)."""
    rendered_by = {}
    for ns in ("bu-1", "bu-2"):
        release_values = json.loads(json.dumps(values))
        if values.get("rbac", {}).get("createNamespaces"):
            release_values["rbac"]["watchNamespaces"] = [ns, f"{ns}-team-a", f"{ns}-team-b"]
        rendered_by[ns] = _cluster_scoped(
            template(k8s_tools, tmp_path, release_values, namespace=ns, release=RELEASE, crds=True)
        )
    first, second = rendered_by["bu-1"], rendered_by["bu-2"]
    shared = set(first) & set(second)
    # The CRD alone is shared: Helm installs it from the chart's crds/ directory (never templated, never
    # owned by a release: the first install creates it, later ones leave it), and it is the same object.
    assert shared == {("CustomResourceDefinition", "distillationruns.distillery.dev")}, sorted(shared)
    crd = ("CustomResourceDefinition", "distillationruns.distillery.dev")
    assert first[crd] == second[crd]
    assert {kind for kind, _ in first} >= {"ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition"}
    for ns, objects in rendered_by.items():
        binding = objects[("ClusterRoleBinding", f"distillery-{ns}")]
        assert binding["roleRef"]["name"] == f"distillery-{ns}"
        assert binding["subjects"][0]["namespace"] == ns


def test_the_watched_namespaces_are_created_only_when_asked(k8s_tools: Tools, tmp_path: Path) -> None:
    assert not rendered(k8s_tools, tmp_path, NAMESPACED).of_kind("Namespace")
    values = {"rbac": {**NAMESPACED["rbac"], "createNamespaces": True}}
    values["rbac"]["watchNamespaces"] = [*values["rbac"]["watchNamespaces"], NAMESPACE]
    out = rendered(k8s_tools, tmp_path, values)
    namespaces = {n["metadata"]["name"]: n for n in out.of_kind("Namespace")}
    # The release namespace is Helm's (--create-namespace) or already there: never the chart's.
    assert set(namespaces) == {"team-a", "team-b"}
    for ns in namespaces.values():
        # Uninstalling the operator must not delete the runs, claims and Secrets a namespace holds.
        assert ns["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}
    assert {r["metadata"]["namespace"] for r in out.of_kind("Role")} == {"team-a", "team-b", NAMESPACE}
    # Cluster-wide, the value means nothing: no namespace is created.
    cluster = {"rbac": {"createNamespaces": True, "watchNamespaces": ["team-a"]}}
    assert not rendered(k8s_tools, tmp_path, cluster).of_kind("Namespace")


def test_rbac_can_be_left_to_the_platform(k8s_tools: Tools, tmp_path: Path) -> None:
    out = rendered(k8s_tools, tmp_path, {"rbac": {"create": False}})
    assert not {"Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding"} & {o["kind"] for o in out.objects}


# ---------------------------------------------------------------------------------------------- NOTES.txt


def test_notes_give_the_next_steps_for_the_mode(k8s_tools: Tools, tmp_path: Path) -> None:
    notes = rendered(k8s_tools, tmp_path).notes
    assert "kubectl -n distillery-system rollout status deployment/distillery" in notes
    assert "every namespace" in notes and "kubectl apply -f examples/run.yaml" in notes
    assert "get drun -w" in notes and "docs/gitops-argocd.md" in notes and "Kueue" not in notes
    notes = rendered(k8s_tools, tmp_path, {**NAMESPACED, **GPU_KUEUE}).notes
    assert "It watches DistillationRuns in: team-a, team-b." in notes
    assert "kubectl -n team-a create secret generic openai" in notes
    assert 'LocalQueue "team-a-gpus"' in notes
    assert "# fast-rwx: docs/storage.md" in notes  # the StorageClass of the claims the operator creates


# ---------------------------------------------------------------------------------------------- metrics

METRICS_ON: dict[str, Any] = {"metrics": {"enabled": True}}
MONITORED: dict[str, Any] = {
    "metrics": {
        "enabled": True,
        "serviceMonitor": {
            "enabled": True,
            "interval": "15s",
            "labels": {"release": "kube-prometheus-stack"},
        },
    }
}


def test_metrics_are_off_by_default(k8s_tools: Tools, tmp_path: Path) -> None:
    out = rendered(k8s_tools, tmp_path)
    assert not out.of_kind("Service") and not out.of_kind("ServiceMonitor")
    container = out.operator_container()
    assert not [a for a in container["args"] if a.startswith("--metrics")]
    assert [p["name"] for p in container["ports"]] == ["probes"]
    assert "Prometheus" not in out.notes


def test_metrics_enabled_serves_a_port_behind_a_cluster_ip_service(k8s_tools: Tools, tmp_path: Path) -> None:
    out = rendered(k8s_tools, tmp_path, METRICS_ON)
    assert not out.of_kind("ServiceMonitor")
    container = out.operator_container()
    assert "--metrics=http://0.0.0.0:8081/metrics" in container["args"]
    ports = {p["name"]: p for p in container["ports"]}
    assert ports["metrics"] == {"name": "metrics", "containerPort": 8081, "protocol": "TCP"}
    assert ports["probes"]["containerPort"] == 8080
    svc = out.one("Service")
    assert svc["metadata"]["name"] == "distillery-metrics" and svc["metadata"]["namespace"] == NAMESPACE
    assert svc["spec"]["type"] == "ClusterIP"
    assert svc["spec"]["ports"] == [
        {"name": "metrics", "port": 8081, "targetPort": "metrics", "protocol": "TCP"}
    ]
    # The Service selects the operator's pod, and only by labels the pod carries.
    pod_labels = out.one("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    assert svc["spec"]["selector"] == out.one("Deployment")["spec"]["selector"]["matchLabels"]
    assert "service/distillery-metrics" in out.notes and "ServiceMonitor" not in out.notes


def test_the_service_monitor_scrapes_the_metrics_service(k8s_tools: Tools, tmp_path: Path) -> None:
    out = rendered(k8s_tools, tmp_path, MONITORED)
    svc, monitor = out.one("Service"), out.one("ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["namespace"] == NAMESPACE
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert monitor["metadata"]["labels"]["app.kubernetes.io/part-of"] == "distillery"
    spec = monitor["spec"]
    assert set(spec) == {"selector", "namespaceSelector", "endpoints"}
    # It selects the metrics Service (its labels) in the release namespace, and only that Service.
    assert set(spec["selector"]) == {"matchLabels"}
    assert spec["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert spec["selector"]["matchLabels"]["distillery.dev/metrics"] == "true"
    assert spec["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    (endpoint,) = spec["endpoints"]
    assert endpoint == {"port": "metrics", "path": "/metrics", "scheme": "http", "interval": "15s"}
    assert endpoint["port"] in {p["name"] for p in svc["spec"]["ports"]}
    # The path it scrapes is the one the operator serves (the --metrics URL's).
    (flag,) = [a for a in out.operator_container()["args"] if a.startswith("--metrics=")]
    assert flag.endswith(":8081" + endpoint["path"])
    assert "the ServiceMonitor distillery has Prometheus scrape them every 15s" in out.notes


def test_metrics_values_that_cannot_work_are_refused(k8s_tools: Tools, tmp_path: Path) -> None:
    for values, expected in (
        (
            {"metrics": {"serviceMonitor": {"enabled": True}}},
            "metrics.serviceMonitor.enabled needs metrics.enabled",
        ),
        ({"metrics": {"enabled": True, "port": 8080}}, "metrics.port must differ from operator.probePort"),
    ):
        path = tmp_path / "bad.yaml"
        path.write_text(yaml.safe_dump(values), encoding="utf-8")
        out = k8s_tools.run(k8s_tools.helm, "template", "x", CHART, "-f", path, check=False)
        assert out.returncode != 0 and expected in out.stderr, (values, out.stderr)
