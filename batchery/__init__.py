"""Batchery: self-hosted batch inference with OpenAI-compatible Files and Batches APIs."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
