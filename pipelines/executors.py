"""Where stage functions run: a local Ray (default), a Ray cluster (RAY_ADDRESS), or in-process."""
from __future__ import annotations

import os
from typing import Any, Callable, Iterable, Iterator


class LocalExecutor:
    name = "local"

    def map_unordered(self, fn: Callable, items: Iterable[Any]) -> Iterator[tuple[Any, Any]]:
        for it in items:
            yield it, fn(it)

    def close(self) -> None:
        pass


class RayExecutor:
    """Runs each item as a Ray task with bounded in-flight work and retries on worker failure."""

    name = "ray"

    def __init__(self, address: str | None = None, num_cpus: int | None = None, max_retries: int = 3,
                 max_in_flight: int | None = None):
        import ray

        self._ray = ray
        self._started = False
        if not ray.is_initialized():
            address = address or os.environ.get("RAY_ADDRESS")
            kw: dict[str, Any] = {"log_to_driver": False, "logging_level": "warning"}
            if address:  # an existing cluster (ray://host:10001 through Ray Client, or a GCS address)
                ray.init(address=address, **kw)
            else:
                ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, **kw)
            self._started = True
        self.max_retries = max_retries
        cpus = int(ray.cluster_resources().get("CPU", 1))
        self.max_in_flight = max_in_flight or max(2, 2 * cpus)

    def map_unordered(self, fn: Callable, items: Iterable[Any]) -> Iterator[tuple[Any, Any]]:
        ray = self._ray
        remote = ray.remote(num_cpus=1, max_retries=self.max_retries)(fn)
        pending: dict[Any, Any] = {}
        it = iter(items)
        exhausted = False
        while True:
            while not exhausted and len(pending) < self.max_in_flight:
                try:
                    item = next(it)
                except StopIteration:
                    exhausted = True
                    break
                pending[remote.remote(item)] = item
            if not pending:
                return
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                item = pending.pop(ref)
                yield item, ray.get(ref)

    def submit(self, fn: Callable, item: Any) -> Any:
        """Start one task now (not bounded by max_in_flight); collect it with as_completed."""
        return self._ray.remote(num_cpus=1, max_retries=self.max_retries)(fn).remote(item)

    def as_completed(self, refs: list) -> Iterator[tuple[Any, Any]]:
        ray = self._ray
        left = list(refs)
        while left:
            done, left = ray.wait(left, num_returns=1)
            yield done[0], ray.get(done[0])

    def close(self) -> None:
        if self._started:
            self._ray.shutdown()


def make_executor(kind: str, num_cpus: int | None = None):
    if kind == "local":
        return LocalExecutor()
    if kind == "ray":
        return RayExecutor(num_cpus=num_cpus)
    raise ValueError(f"unknown executor {kind!r}; use 'ray' or 'local'")
