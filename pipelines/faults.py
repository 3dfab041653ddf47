"""Fault injection for failure tests: M2FD_INJECT_FAULT="stage:substring[,stage:substring...]" makes
the task of that stage (ingest, extract, encode, label, shard) raise InjectedFault for every item
whose URI contains the substring. Read inside the task; the Ray executor passes the driver's value to
its tasks (runtime_env), so it reaches the workers of a cluster or of a Ray started before it was set.
Unset, it costs one dict lookup. Production runs never set it."""
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
