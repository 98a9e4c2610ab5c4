"""Values the chart is rendered with in the tests: defaults, namespaced, GPU placement with Kueue, all
(metrics and the ServiceMonitor included)."""

from __future__ import annotations

from typing import Any

NAMESPACED: dict[str, Any] = {"rbac": {"scope": "namespaced", "watchNamespaces": ["team-a", "team-b"]}}
GPU_KUEUE: dict[str, Any] = {
    "workloads": {
        "trainerImage": "registry.example/distillery-trainer:0.1.0",
        "vllmImage": "registry.example/vllm-openai:v0.32.0",
        "imagePullPolicy": "Always",
        "gpuResource": "amd.com/gpu",
        "trainingRuntime": "torch-tuned",
        "nodeSelector": {"node.kubernetes.io/instance-type": "p5.48xlarge"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "priorityClassName": "batch-high",
        "storageClassName": "fast-rwx",
        "deadlines": {"collectSeconds": 43200, "trainSeconds": 259200, "evaluateSeconds": 7200},
        "stallTimeoutSeconds": 1800,
        "kueue": {"queueName": "team-a-gpus"},
        "resources": {
            "collection": {"requests": {"cpu": "250m", "memory": "512Mi"}},
            "evaluation": {"limits": {"memory": "8Gi"}},
            "training": {"requests": {"cpu": "16", "memory": "256Gi"}},
            "vllm": {"requests": {"cpu": "8", "memory": "64Gi"}},
        },
        "shmSize": "16Gi",
        "runAsUser": 2000,
    },
    "policy": {
        "allowedImagePrefixes": ["registry.example/"],
        "allowSchedulingOverrides": True,
        "allowedPriorityClasses": ["batch-high"],
        "vllmArgsAllowlist": ["--enforce-eager", "--max-num-seqs"],
    },
}
EVERYTHING: dict[str, Any] = {
    **NAMESPACED,
    **GPU_KUEUE,
    "image": {
        "repository": "registry.example/distillery-operator",
        "tag": "0.1.0-rc1",
        "pullPolicy": "Always",
    },
    "imagePullSecrets": [{"name": "registry"}],
    "serviceAccount": {"create": True, "name": "distillery", "annotations": {"iam.example/role": "x"}},
    "operator": {
        "logLevel": "debug",
        "probePort": 9000,
        "nodeSelector": {"kubernetes.io/os": "linux"},
        "tolerations": [{"key": "control-plane", "operator": "Exists"}],
        "affinity": {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [
                        {"matchExpressions": [{"key": "pool", "operator": "In", "values": ["system"]}]}
                    ]
                }
            }
        },
        "priorityClassName": "system-cluster-critical",
        "podAnnotations": {"prometheus.io/scrape": "false"},
        "podLabels": {"team": "platform"},
        "extraEnv": [{"name": "HTTPS_PROXY", "value": "http://proxy:3128"}],
    },
    "metrics": {
        "enabled": True,
        "port": 9001,
        "serviceMonitor": {
            "enabled": True,
            "interval": "15s",
            "labels": {"release": "kube-prometheus-stack"},
        },
    },
}
SCENARIOS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "namespaced": NAMESPACED,
    "gpu-kueue": GPU_KUEUE,
    "everything": EVERYTHING,
}
