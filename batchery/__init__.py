"""Batchery: self-hosted batch inference with OpenAI-compatible Files and Batches APIs."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["Client", "__version__"]

if TYPE_CHECKING:
    from batchery.client import Client


def __getattr__(name: str) -> Any:
    # Lazily: the server and workers import `batchery` and need no HTTP client.
    if name == "Client":
        from batchery.client import Client

        return Client
    raise AttributeError(f"module 'batchery' has no attribute {name!r}")
