"""Fluent fixtures (in the style of kueue's ``MakeWorkload(...).Obj()``): ``make_run().kd().obj()``."""

from __future__ import annotations

import copy
from typing import Any

DELETE = object()  # a patch value that removes the key


def merge(base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge ``patch`` into a copy of ``base``; ``DELETE`` removes a key."""
    out = copy.deepcopy(base)
    for key, value in patch.items():
        if value is DELETE:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


class RunBuilder:
    def __init__(self, name: str = "minimal", namespace: str | None = None) -> None:
        meta: dict[str, Any] = {"name": name}
        if namespace:
            meta["namespace"] = namespace
        self._obj: dict[str, Any] = {
            "apiVersion": "distillery.dev/v1alpha1",
            "kind": "DistillationRun",
            "metadata": meta,
            "spec": {
                "teacher": {
                    "endpoint": {
                        "baseURL": "https://api.openai.com/v1",
                        "model": "gpt-4o",
                        "apiKeySecretRef": {"name": "openai", "key": "api-key"},
                    }
                },
                "student": {"model": "meta-llama/Llama-3.1-8B-Instruct"},
                "data": {"prompts": {"pvcPath": "prompts.jsonl"}},
            },
        }

    def patch(self, patch: dict[str, Any]) -> RunBuilder:
        self._obj = merge(self._obj, patch)
        return self

    def spec(self, patch: dict[str, Any]) -> RunBuilder:
        return self.patch({"spec": patch})

    def self_hosted(self, model: str = "Qwen/Qwen2.5-7B-Instruct") -> RunBuilder:
        return self.spec({"teacher": {"endpoint": DELETE, "selfHosted": {"model": model}}})

    def kd(self, **kd: Any) -> RunBuilder:
        return self.spec({"teacher": {"logprobs": {"topK": 20}}, "training": {"method": "kd", "kd": kd}})

    def storage(self, claim: str = "distill-data") -> RunBuilder:
        return self.spec({"storage": {"pvc": {"claimName": claim}}})

    def obj(self) -> dict[str, Any]:
        return copy.deepcopy(self._obj)


def make_run(name: str = "minimal", namespace: str | None = None) -> RunBuilder:
    return RunBuilder(name, namespace)
