"""A run's name: the one rule, judged by the model (``distillery validate``, ``distillery run``), by the
CRD's CEL rules at the root of its schema (the API server, on create) and by the operator's planner.

A run's children are named after it, and so are their pods: ``<run>-<component>`` for each child (the
components are listed here, the operator's :mod:`naming` reads them), ``<job>-<i>`` for the hostname of an
Indexed Job's pod i, and ``<job>-master-0`` / ``<job>-worker-<i>`` for a Kubeflow PyTorchJob's pods and
the Service the training operator makes for each. Services must be RFC 1035 labels (a lowercase letter
first, then lowercase letters, digits and '-', a letter or digit last, at most 63 characters), and so must
pod hostnames in practice, so a run's name is an RFC 1035 label short enough that its longest child name
fits: the bound below is computed from the suffixes, with the most shards (``collection.shards``) and
training nodes (``training.resources.nodes``) the spec allows.
"""

from __future__ import annotations

import re

# The widest run the spec allows (the fields' upper bounds in :mod:`.spec`).
MAX_SHARDS = 10000
MAX_NODES = 1024

# The components: each child is named ``<run>-<component>``.
CONFIG = "config"
DATA = "data"
TEACHER = "teacher"
COLLECT = "collect"
TRAIN = "train"
SERVE = "serve"
EVAL = "eval"
COMPONENTS = (CONFIG, DATA, TEACHER, COLLECT, TRAIN, SERVE, EVAL)

# The longest suffix each kind of name adds to the run's name: the children's own, the hostnames of the
# Indexed Jobs' pods (collection shards; training when it runs as an Indexed Job), and the PyTorchJob's
# worker pods and their Services (Kubeflow names them <job>-worker-<i>, i up to nodes - 2).
SUFFIXES = {
    **{f"<run>-{c}": f"-{c}" for c in COMPONENTS},
    "<run>-collect-<shard>": f"-{COLLECT}-{MAX_SHARDS - 1}",
    "<run>-train-<node>": f"-{TRAIN}-{MAX_NODES - 1}",
    "<run>-train-master-0": f"-{TRAIN}-master-0",
    "<run>-train-worker-<i>": f"-{TRAIN}-worker-{MAX_NODES - 2}",
}
LONGEST = max(SUFFIXES, key=lambda k: len(SUFFIXES[k]))
MAX_RUN_NAME = 63 - len(SUFFIXES[LONGEST])

RUN_NAME_PATTERN = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
_RUN_NAME = re.compile(RUN_NAME_PATTERN)
_HOW = (
    f"a run's name must start with a lowercase letter, contain only lowercase letters, digits and '-', "
    f"end with a letter or a digit (an RFC 1035 label: its Services are named after it) and have at most "
    f"{MAX_RUN_NAME} characters (its longest child name, {LONGEST}, must fit 63)"
)

# The same rule as CEL at the root of the CRD's schema (the API server lets a root rule read
# self.metadata.name); `distillery validate` reports them at metadata.name. Judged on create: the API
# server drops a create's status (the status subresource), so `has(self.status)` only exempts a run that
# exists, whose name cannot change -- one created under an older CRD can still get its status (the
# operator's InvalidSpec) written.
RUN_NAME_RULES = [
    {
        "rule": f"has(self.status) || self.metadata.name.matches('{RUN_NAME_PATTERN}')",
        "message": "metadata.name: " + _HOW.split(" and have at most")[0],
    },
    {
        "rule": f"has(self.status) || size(self.metadata.name) <= {MAX_RUN_NAME}",
        "message": f"metadata.name: at most {MAX_RUN_NAME} characters (the run's longest child name, "
        f"{LONGEST}, must fit 63)",
    },
]


def run_name_problem(name: str) -> str | None:
    """What is wrong with ``name`` as a run's name (the message names the rule), or None."""
    if not name:
        return "a run needs a name"
    if len(name) > MAX_RUN_NAME:
        why = f"{len(name)} characters, at most {MAX_RUN_NAME}"
    elif not name[0].isascii() or not name[0].islower():
        why = "it does not start with a lowercase letter"
    elif not name[-1].isascii() or not name[-1].isalnum():
        why = "it does not end with a letter or a digit"
    elif _RUN_NAME.match(name) is None:
        why = "only lowercase letters, digits and '-' are allowed"
    else:
        return None
    return f"{name!r} is not a valid run name ({why}): {_HOW}"
