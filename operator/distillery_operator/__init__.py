"""Distillery's control plane: the API's CRD, offline validation, the operator and the local executor."""

from distillery_trainer import __version__

__all__ = ["__version__"]
