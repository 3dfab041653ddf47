"""Fault injection for failure tests: M2FD_INJECT_FAULT="stage:substring[,stage:substring...]" makes
the task of that stage (ingest, extract, encode, label, shard) raise InjectedFault for every item
whose URI contains the substring. Read inside the task, so it reaches Ray workers (they inherit
the driver's environment); unset, it costs one dict lookup. Production runs never set it."""
from __future__ import annotations

import os

ENV = "M2FD_INJECT_FAULT"


class InjectedFault(RuntimeError):
    pass


def maybe_fail(stage: str, uri: str) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    for entry in spec.split(","):
        st, _, needle = entry.strip().partition(":")
        if st == stage and needle and needle in uri:
            raise InjectedFault(f"fault injected by {ENV}={spec!r} into the {stage} task of {uri}")
