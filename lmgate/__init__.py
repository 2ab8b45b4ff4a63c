"""LMGate: a self-hosted pass-through gateway for LLM provider APIs."""

__version__ = "0.1.0"
