"""Serving with vLLM's OpenAI-compatible server: one argument builder for the operator's Deployments and
the local launcher (``distillery-trainer serve``)."""

from .args import VLLM_IMAGE, VLLM_PORT, VllmServer

__all__ = ["VLLM_IMAGE", "VLLM_PORT", "VllmServer"]
