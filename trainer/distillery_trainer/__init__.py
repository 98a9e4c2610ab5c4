"""Distillery's stage workloads: collect, train, serve, evaluate.

Importing this package (or ``distillery_trainer.api``) imports no torch: heavy imports stay inside the
stage that needs them, so ``distillery-trainer --help`` and the operator stay light.
"""

__version__ = "0.1.0"
