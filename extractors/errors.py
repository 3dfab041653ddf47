"""The one exception type stages raise for bad input; the runner turns it into a quarantine row."""
from __future__ import annotations

from typing import Any

from storage_schemas.vocab import QUARANTINE_REASONS


class Reject(Exception):
    """An input cannot yield clips, for a machine-readable ``reason`` with a human ``message``."""

    def __init__(self, reason: str, message: str, **detail: Any):
        if reason not in QUARANTINE_REASONS:
            raise ValueError(f"unknown quarantine reason {reason!r}")
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message
        self.detail = detail

    def __reduce__(self):  # survives a process boundary (a Ray task raising it) with its fields
        return _rebuild_reject, (self.reason, self.message, self.detail)


def _rebuild_reject(reason: str, message: str, detail: dict) -> "Reject":
    return Reject(reason, message, **detail)
