"""The API server refuses what the model refuses: every invalid spec of the suite
(:mod:`tests.support.invalid_runs`) goes through the model and through the CRD -- its ``openAPIV3Schema``
(jsonschema, as the API server's structural validation) and its CEL rules (cel-python, typed by the schema
as the API server types them) -- and both must refuse it at the same field path, except the few cases
listed in ``OPERATOR_SIDE`` with why. Near misses of each cross-field rule must pass both.

cel-python plays the API server's CEL here (there is no kube-apiserver on these machines): it evaluates the
same expressions, but does not estimate their cost, so a test below bounds what the API server's cost
estimate grows with (the length of a string a regex reads, the size of a list a macro walks).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest
from distillery_operator.crd import openapi_schema
from distillery_operator.validate import LOCAL, cel_errors, schema_errors, validate_document
from distillery_trainer.api import SpecError, parse_run

from tests.support.builders import make_run
from tests.support.invalid_runs import CASES, CLUSTER_ONLY, OPERATOR_SIDE, Case


def model_paths(doc: dict[str, Any]) -> set[str]:
    try:
        parse_run(doc)
    except SpecError as err:
        return {p for p, _ in err.errors}
    return set()


def crd_paths(doc: dict[str, Any]) -> set[str]:
    return {p for p, _ in schema_errors(doc)} | {p for p, _ in cel_errors(doc)}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_the_crd_and_the_model_refuse_the_same_specs(case: Case) -> None:
    doc = case.doc()
    assert case.path in model_paths(doc)
    if case.id in OPERATOR_SIDE:
        # Listed as the operator's alone: if the CRD learns it, the list must lose it.
        assert case.path not in crd_paths(doc), (
            f"{case.id} is refused by the CRD now: drop it from OPERATOR_SIDE"
        )
    else:
        assert case.path in crd_paths(doc), (schema_errors(doc), cel_errors(doc))


def test_the_operator_side_list_names_real_cases() -> None:
    assert set(OPERATOR_SIDE) <= {c.id for c in CASES}
    assert all(len(why) > 40 for why in OPERATOR_SIDE.values())


ENDPOINT = {"teacher": {"endpoint": {"baseURL": "https://api.openai.com/v1"}}}
NEAR_MISSES = {
    # Each cross-field rule's closest valid neighbour: both layers accept it.
    "topk-20-at-openai": {**ENDPOINT, "teacher": {**ENDPOINT["teacher"], "logprobs": {"topK": 20}}},
    "topk-64-at-vllm": {
        "teacher": {"endpoint": {"baseURL": "http://vllm:8000/v1"}, "logprobs": {"topK": 64}}
    },
    "topk-64-at-a-lookalike": {
        "teacher": {"endpoint": {"baseURL": "https://openai.com.example.org/v1"}, "logprobs": {"topK": 64}}
    },
    "at-sign-in-the-path": {"teacher": {"endpoint": {"baseURL": "https://h.example.com/v1/@team?x=a@b"}}},
    "url-with-port": {"teacher": {"endpoint": {"baseURL": "http://10.0.0.1:8000/v1"}}},
    "url-ipv6": {"teacher": {"endpoint": {"baseURL": "http://[fd00::1]:8000/v1"}}},
    "seqkd-samples-sampled": {"training": {"method": "seqkd", "seqkd": {"samples": 4}}},
    "seqkd-one-greedy-sample": {
        "teacher": {"sampling": {"temperature": 0}},
        "training": {"method": "seqkd", "seqkd": {"samples": 1}},
    },
    "greedy-sft": {"teacher": {"sampling": {"temperature": 0}}, "training": {"seqkd": {"samples": 4}}},
    "parallelism-equals-shards": {"collection": {"shards": 4, "parallelism": 4}},
    "off-policy-sft-steps": {"training": {"onPolicy": {"offPolicyDivergence": "none", "sftWeight": 0.5}}},
    "off-policy-kd-without-anchor": {
        "training": {"onPolicy": {"offPolicyDivergence": "forwardKL", "sftWeight": 0}}
    },
    "lora-with-ddp": {"student": {"lora": {"rank": 8}}, "training": {"strategy": "ddp"}},
    "fsdp-without-lora": {"training": {"strategy": "fsdp"}},
    "kd-topk-with-logprobs": {"teacher": {"logprobs": {"topK": 5}}, "training": {"method": "kd"}},
    "kd-source-topk-unused-by-sft": {"training": {"kd": {"source": "online"}}},
    "metrics-distinct": {"evaluation": {"metrics": ["rouge_l", "exact_match"]}},
    "claim-half-a-gibibyte": {"storage": {"pvc": {"claimName": "d", "create": {"size": "0.5Gi"}}}},
    "claim-both-modes": {
        "storage": {
            "pvc": {
                "claimName": "d",
                "create": {"size": "1Ti", "accessModes": ["ReadWriteOnce", "ReadWriteMany"]},
            }
        }
    },
}
SELF_HOSTED_NEAR_MISSES = {
    "kd-online-self-hosted": {"training": {"method": "kd", "kd": {"source": "online"}}},
    "kd-auto-self-hosted": {"training": {"method": "kd"}},
}


def _near_misses() -> Iterator[tuple[str, dict[str, Any]]]:
    for name, patch in NEAR_MISSES.items():
        yield name, make_run().storage().spec(patch).obj()
    for name, patch in SELF_HOSTED_NEAR_MISSES.items():
        yield name, make_run().self_hosted().storage().spec(patch).obj()


@pytest.mark.parametrize(("name", "doc"), list(_near_misses()), ids=lambda x: x if isinstance(x, str) else "")
def test_near_misses_pass_both(name: str, doc: dict[str, Any]) -> None:
    assert model_paths(doc) == set()
    assert schema_errors(doc) == [] and cel_errors(doc) == []
    assert validate_document(doc).errors == []


@pytest.mark.parametrize("case", CLUSTER_ONLY, ids=[c.id for c in CLUSTER_ONLY])
def test_cluster_only_rules_are_validates_and_the_operators(case: Case) -> None:
    """Valid resources (``distillery run`` runs them) that a cluster cannot run: the model and the CRD
    accept them, ``distillery validate`` refuses them for a cluster (its default) and not for ``--target
    local``; the planner refuses them too (tests/operator/unit/test_planner.py)."""
    doc = case.doc()
    assert model_paths(doc) == set() and crd_paths(doc) == set()
    report = validate_document(doc)
    assert case.path in {p for p, _ in report.errors}, report.errors
    assert case.says in " ".join(m for p, m in report.errors if p == case.path)
    assert validate_document(doc, target=LOCAL).errors == []


# ---------------------------------------------------------------------------------------------- cost

# The API server estimates each rule's worst-case cost from the schema and refuses a CRD over budget: a
# regex over a string costs with the string's maxLength, a macro over a list or map with its maxItems /
# maxProperties. Every string a rule reads with matches() and every list or map a rule walks is bounded.
STRING_BOUND, LIST_BOUND = 4096, 64


def _rules(node: Any, path: str = "") -> Iterator[tuple[str, dict[str, Any], str]]:
    if not isinstance(node, dict):
        return
    for rule in node.get("x-kubernetes-validations", []):
        yield path, node, rule["rule"]
    for name, sub in (node.get("properties") or {}).items():
        yield from _rules(sub, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        yield from _rules(node["items"], f"{path}[]")


def _field(node: dict[str, Any], dotted: str) -> dict[str, Any]:
    for part in dotted.split("."):
        node = node["properties"][part]
    return node


def test_every_rule_reads_bounded_values() -> None:
    rules = list(_rules(openapi_schema()))
    assert len(rules) >= 20
    for path, node, rule in rules:
        for target in re.findall(r"self((?:\.\w+)*)\.matches\(", rule):
            if target == ".metadata.name":
                continue  # bounded by the API server itself (ObjectMeta)
            field = _field(node, target.lstrip(".")) if target else node
            assert 0 < field.get("maxLength", 10**9) <= STRING_BOUND, (path, rule)
        if re.search(r"\bself\.(all|exists|exists_one|filter|map)\(", rule):
            bound = node.get("maxItems", node.get("maxProperties", 10**9))
            assert bound <= LIST_BOUND, (path, rule)
            if node.get("type") == "object":  # map keys read by a regex
                assert "matches(" not in rule or node.get("maxProperties", 10**9) <= LIST_BOUND


def test_every_rule_compiles_and_says_what_to_do() -> None:
    import celpy

    env = celpy.Environment()
    for _path, _, rule in _rules(openapi_schema()):
        env.compile(rule)
    messages = [
        r["message"] for r in openapi_schema()["properties"]["spec"].get("x-kubernetes-validations", [])
    ]
    assert all(len(m) > 30 for m in messages)
