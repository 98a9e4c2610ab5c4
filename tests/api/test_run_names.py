"""One rule for a run's name, judged the same by the model (``distillery validate``, ``distillery run``), the
CRD's CEL rules at the root of the schema (what the API server checks on create) and the operator's
planner (tests/operator/unit/test_planner.py): an RFC 1035 label short enough for the longest name and pod
hostname the builders give its children (tests/operator/unit/test_builders.py builds them)."""

from __future__ import annotations

import pytest
from distillery_operator.crd import openapi_schema
from distillery_operator.validate import cel_errors, validate_document
from distillery_trainer.api import SpecError, parse_run
from distillery_trainer.api.names import MAX_RUN_NAME, run_name_problem

from tests.support.builders import make_run

AT_BOUND = ("run-8b-" + "x" * MAX_RUN_NAME)[:MAX_RUN_NAME]

# (name, valid, what the message says)
NAMES = [
    ("8b-distill", False, "start with a lowercase letter"),
    ("a", True, ""),
    ("contracts-8b", True, ""),
    (AT_BOUND, True, ""),
    (AT_BOUND + "z", False, f"at most {MAX_RUN_NAME} characters"),
    ("Contracts-8b", False, "lowercase"),
    ("contracts.8b", False, "lowercase letters, digits and '-'"),
    ("contracts-", False, "end with a letter or a digit"),
    ("-contracts", False, "start with a lowercase letter"),
]


def test_the_bound_is_the_longest_child_suffix() -> None:
    # <run>-train-worker-<i>: a PyTorchJob's worker pod and its Service, i up to nodes - 2 (1022).
    assert MAX_RUN_NAME == 63 - len("-train-worker-1022") == 45
    assert len(AT_BOUND) == MAX_RUN_NAME


def doc(name: str) -> dict[str, object]:
    return make_run(name, "team-a").storage().obj()


@pytest.mark.parametrize(("name", "valid", "says"), NAMES, ids=[n[:20] for n, _, _ in NAMES])
def test_the_model_and_validate_judge_the_name(name: str, valid: bool, says: str) -> None:
    problem = run_name_problem(name)
    report = validate_document(doc(name))
    if valid:
        assert problem is None
        parse_run(doc(name))
        assert report.ok, report.errors
        return
    assert problem is not None and says in problem
    with pytest.raises(SpecError) as err:
        parse_run(doc(name))
    assert [p for p, _ in err.value.errors] == ["metadata.name"]
    assert says in err.value.errors[0][1]
    # `distillery validate`: the model's message, once, with its path (the CRD's rule says the same).
    assert [p for p, _ in report.errors] == ["metadata.name"], report.errors


@pytest.mark.parametrize(("name", "valid", "says"), NAMES, ids=[n[:20] for n, _, _ in NAMES])
def test_the_crd_cel_rules_judge_the_name(name: str, valid: bool, says: str) -> None:
    """The root rules (``self.metadata.name``), evaluated with cel-python as the API server would."""
    errs = cel_errors(doc(name))
    if valid:
        assert errs == []
    else:
        assert errs and {p for p, _ in errs} == {"metadata.name"}, errs


def test_the_rules_sit_at_the_root_of_the_schema() -> None:
    rules = openapi_schema()["x-kubernetes-validations"]
    texts = " ".join(r["rule"] for r in rules)
    assert "self.metadata.name.matches(" in texts and f"size(self.metadata.name) <= {MAX_RUN_NAME}" in texts


def test_a_run_that_exists_is_not_refused_its_status() -> None:
    """The API server drops the status of a create, so the rules judge every new run; a run created under an
    older CRD (its name cannot change) still gets the operator's status written (InvalidSpec)."""
    assert cel_errors({**doc("8b-distill"), "status": {"phase": "Failed"}}) == []
    assert cel_errors(doc("8b-distill")) != []
