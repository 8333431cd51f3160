"""Signed webhooks for batch, message batch and job events, delivered from an outbox."""

from __future__ import annotations
