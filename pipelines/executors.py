"""Where stage functions run: a local Ray (default), a Ray cluster (RAY_ADDRESS), or in-process.

Both executors offer the same calls, so a stage never asks which one it has:
``map_unordered(fn, items, **resources)`` (bounded in-flight work), ``submit(fn, item)`` + ``as_completed(handles)``
(start work early, collect it later: Ray starts it at once, in-process it runs when collected),
``has_gpu()`` (whether a task asking for a GPU, or a share of one, can be placed), and ``pool(fn, threads,
**resources)``: the same submit/map_unordered for one function whose items run ``threads`` at a time in each
worker process (on Ray, threaded actors; in-process, threads), so items can share what a process holds."""
from __future__ import annotations

import ctypes
import functools
import os
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

from extractors.media import DECODE_LOG_ENV
from pipelines import faults


# glibc keeps freed memory of native libraries (MediaPipe, decoders, pocketsphinx) in per-thread
# arenas: a long-lived worker's resident size then drifts up task after task (measured: 0.75 -> 1.45 GB
# between extraction tasks). Two arenas, and the heap trimmed when each task ends (stage_task), bring it
# back after every task. A low MALLOC_TRIM_THRESHOLD_ did that before, but setting it turns off glibc's
# adaptive mmap threshold, so every array over 128 KB (a decoded frame, a crop batch) was mapped and faulted
# in afresh: on the real videos x4, 84-87 s of kernel time instead of 39 s, and the run 1.2x as long
# (bench/RESULTS.md, #13).
# MKL_CBWR: see pipelines/__init__.py (set again here so that a worker has it from its first instruction)
# PYTORCH_CUDA_ALLOC_CONF: a GPU is shared by many workers (extract.tasks_per_gpu), each with PyTorch's caching
# allocator; with its default fixed-size segments, 16 extraction workers on an 80 GB H100 ran out of GPU memory
# (72-77 GB at peak with expandable segments; bench/RESULTS.md, #15). It changes where tensors live, not what is
# computed; a value the user set is kept.
WORKER_ENV = {"MALLOC_ARENA_MAX": "2", "MKL_CBWR": os.environ["MKL_CBWR"],
              "PYTORCH_CUDA_ALLOC_CONF": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")}


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc; None elsewhere (musl, macOS)
    except (OSError, AttributeError):
        return None


def trim_heap() -> None:
    """Hand the process's freed heap memory back to the OS (glibc malloc_trim; a no-op elsewhere)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def stage_task(fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """Marks a stage's per-item task function (the functions STAGES names): when it returns or raises, the
    process trims its heap, so a long-lived Ray worker (or the driver, in-process) is back near its size
    before the task. The wrapper keeps the function's name (Ray names its worker ray::<name>) and is what
    the module holds, so Ray ships it by reference."""
    @functools.wraps(fn)
    def run(item: Any) -> Any:
        try:
            return fn(item)
        finally:
            trim_heap()

    return run


@dataclass(frozen=True)
class TaskFailure:
    """What a stage gets instead of a result when its task raised or its worker died (after Ray's
    retries): the stage turns it into quarantine rows for that item, and the run goes on."""

    error: str  # "ExceptionType: message", one line
    trace: str  # the last lines of the traceback
    reject: Any = None  # the extractors.errors.Reject the task raised, if that is what it raised

    @classmethod
    def of(cls, e: BaseException) -> "TaskFailure":
        from extractors.errors import Reject

        cause = getattr(e, "cause", None)  # RayTaskError wraps the task's own exception
        inner = cause if isinstance(cause, BaseException) else e
        msg = str(inner).strip().splitlines()
        tb = "".join(traceback.format_exception(inner))
        return cls(f"{type(inner).__name__}: {msg[0][:300] if msg else ''}".rstrip(": "), tb[-2000:],
                   inner if isinstance(inner, Reject) else None)

    def detail(self) -> dict:
        return {"error": self.error, "traceback_tail": self.trace[-800:]}


@dataclass(eq=False)  # a handle is itself (hashable by identity), whatever its item holds
class _Deferred:
    fn: Callable
    item: Any


class LocalExecutor:
    name = "local"

    def has_gpu(self) -> bool:
        import torch

        return torch.cuda.is_available()

    def submit(self, fn: Callable, item: Any, **resources: Any) -> "_Deferred":
        """A handle that runs ``fn(item)`` when as_completed reaches it (in this process, in order)."""
        return _Deferred(fn, item)

    def as_completed(self, handles: list["_Deferred"]) -> Iterator[tuple[Any, Any]]:
        for h in handles:
            yield h, next(self.map_unordered(h.fn, [h.item]))[1]

    def map_unordered(self, fn: Callable, items: Iterable[Any], **resources: Any) -> Iterator[tuple[Any, Any]]:
        """(item, result) per item; a task that raises yields a TaskFailure as its result. Ray resource
        requests (``num_gpus=1``) mean nothing in-process."""
        for it in items:
            try:
                res = fn(it)
            except Exception as e:  # noqa: BLE001 - one item's failure is that item's, not the run's
                res = TaskFailure.of(e)
            yield it, res

    def pool(self, fn: Callable, threads: int = 1, **resources: Any) -> "TaskPool":
        """``fn``'s items ``threads`` at a time in threads of this process (map_unordered); submitted items run
        one by one when collected, as submit's do."""
        return TaskPool(self, fn, resources) if threads <= 1 else _ThreadPool(self, fn, threads)

    def close(self) -> None:
        pass


class TaskPool:
    """One function's items as the executor's own tasks (a pool of one thread per worker)."""

    def __init__(self, ex, fn: Callable, resources: dict):
        self.ex, self.fn, self.resources = ex, fn, resources

    def submit(self, item: Any) -> Any:
        return self.ex.submit(self.fn, item, **self.resources)

    def map_unordered(self, items: Iterable[Any]) -> Iterator[tuple[Any, Any]]:
        return self.ex.map_unordered(self.fn, items, **self.resources)

    def close(self) -> None:
        pass


class _ThreadPool(TaskPool):
    def __init__(self, ex: "LocalExecutor", fn: Callable, threads: int):
        super().__init__(ex, fn, {})
        self.threads = threads

    def map_unordered(self, items: Iterable[Any]) -> Iterator[tuple[Any, Any]]:
        from concurrent.futures import ThreadPoolExecutor

        items = list(items)  # work descriptors, not data
        with ThreadPoolExecutor(self.threads) as tp:
            # each item through the executor's own loop: a raising item yields its TaskFailure
            yield from tp.map(lambda x: next(self.ex.map_unordered(self.fn, [x])), items)


_END = object()


class _TaskHost:
    """A Ray actor that runs one stage task function on the items it is sent, several at a time in its
    threads (max_concurrency): the items share what the process holds (models, a shared tracker)."""

    def __init__(self, fn: Callable):
        self.fn = fn

    def run(self, item: Any) -> Any:
        return self.fn(item)


class _ActorPool(TaskPool):
    """Threaded actors, created as items need them up to what the cluster's nodes can place; an item goes to
    the actor with the fewest items in flight. An actor whose process dies is restarted and its items
    retried (Ray's max_task_retries), then reported as TaskFailure like a task's; an item that kills its
    process also costs the items beside it a retry each."""

    def __init__(self, ex: "RayExecutor", fn: Callable, threads: int, resources: dict):
        super().__init__(ex, fn, resources)
        ray = ex._ray
        opts = {**ex._opts(), **resources}
        opts.pop("max_retries", None)
        opts.pop("max_calls", None)
        # an actor holds `threads` items at once: their CPUs (up to what one node has) and memory, and the one
        # GPU share they use together
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        opts["num_cpus"] = min(opts.get("num_cpus", 1) * threads, max([r.get("CPU", 0) for r in nodes] + [1]))
        if "memory" in opts:
            opts["memory"] = opts["memory"] * threads
        # the actors the nodes can hold at once, node by node (an actor that no node can place would leave
        # the items sent to it waiting for ever)
        need = {"CPU": opts["num_cpus"], "GPU": opts.get("num_gpus", 0), "memory": opts.get("memory", 0)}
        fit = sum(min(int(r.get(k, 0) / v + 1e-9) for k, v in need.items() if v) for r in nodes)
        if fit < 1:
            raise ValueError(f"no node of this Ray cluster can hold a worker of {threads} {fn.__name__} items "
                             f"({need}); lower sources_per_worker")
        self.max_actors, self.threads = fit, threads
        # an actor whose process dies comes back (max_restarts -1) and its items are retried up to max_retries
        self._host = ray.remote(max_concurrency=threads, max_restarts=-1, max_task_retries=ex.max_retries,
                                **opts)(_TaskHost)
        self._actors: list = []
        self._load: list[int] = []
        self._inflight: dict = {}  # ref -> actor index

    def _settle(self) -> None:
        if self._inflight:
            done, _ = self.ex._ray.wait(list(self._inflight), num_returns=len(self._inflight), timeout=0)
            for ref in done:
                self._load[self._inflight.pop(ref)] -= 1

    def submit(self, item: Any) -> Any:
        self._settle()
        i = min(range(len(self._actors)), key=self._load.__getitem__) if self._actors else -1
        if (i < 0 or self._load[i] >= self.threads) and len(self._actors) < self.max_actors:
            self._actors.append(self._host.remote(self.fn))
            self._load.append(0)
            i = len(self._actors) - 1
        ref = self._actors[i].run.remote(item)
        self._inflight[ref] = i
        self._load[i] += 1
        return ref

    def map_unordered(self, items: Iterable[Any]) -> Iterator[tuple[Any, Any]]:
        return self.ex._stream(self.submit, items, self.max_actors * self.threads)

    def close(self) -> None:
        """Ends the actors (their GPU shares go back to the cluster for the next stage)."""
        for a in self._actors:
            self.ex._ray.kill(a)
        self._actors, self._load, self._inflight = [], [], {}


class RayExecutor:
    """Runs each item as a Ray task with bounded in-flight work and retries on worker failure."""

    name = "ray"

    def __init__(self, address: str | None = None, num_cpus: int | None = None, max_retries: int = 3,
                 max_in_flight: int | None = None, max_calls: int | None = None):
        import ray

        self._ray = ray
        self._started = False
        if not ray.is_initialized():
            address = address or os.environ.get("RAY_ADDRESS")
            kw: dict[str, Any] = {"log_to_driver": False, "logging_level": "warning",
                                  "runtime_env": {"env_vars": WORKER_ENV}}
            if address:  # an existing cluster (ray://host:10001 through Ray Client, or a GCS address)
                ray.init(address=address, **kw)
            else:
                for k, v in WORKER_ENV.items():  # the local raylet (and so its workers) inherit these
                    os.environ.setdefault(k, v)
                ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, **kw)
            self._started = True
        self.max_retries = max_retries
        # replace a worker process after this many tasks (0: never, Ray's default); measured on the
        # 4x e2e input, recycling every 2 tasks did not lower the peak (it is set by which tasks run at once)
        self.max_calls = max_calls if max_calls is not None else int(os.environ.get("M2FD_RAY_MAX_CALLS", "0"))
        cpus = int(ray.cluster_resources().get("CPU", 1))
        self.max_in_flight = max_in_flight or max(2, 2 * cpus)

    def has_gpu(self) -> bool:
        return self._ray.cluster_resources().get("GPU", 0) >= 1

    def map_unordered(self, fn: Callable, items: Iterable[Any], **resources: Any) -> Iterator[tuple[Any, Any]]:
        """(item, result) as tasks finish; ``resources`` override the task options (``num_gpus=1``)."""
        remote = self._ray.remote(**{**self._opts(), **resources})(fn)
        return self._stream(remote.remote, items, self.max_in_flight)

    def _stream(self, start: Callable[[Any], Any], items: Iterable[Any], bound: int) -> Iterator[tuple[Any, Any]]:
        """(item, result) as they finish, at most ``bound`` items started (``start(item)`` -> object ref) and
        not yet collected."""
        pending: dict[Any, Any] = {}
        it = iter(items)
        while True:
            while len(pending) < bound and (item := next(it, _END)) is not _END:
                pending[start(item)] = item
            if not pending:
                return
            done, _ = self._ray.wait(list(pending), num_returns=1)
            yield pending.pop(done[0]), self._get(done[0])

    def submit(self, fn: Callable, item: Any, **resources: Any) -> Any:
        """Start one task now (not bounded by max_in_flight); collect it with as_completed."""
        return self._ray.remote(**{**self._opts(), **resources})(fn).remote(item)

    def pool(self, fn: Callable, threads: int = 1, **resources: Any) -> TaskPool:
        """``fn``'s items as tasks (``threads`` 1), or ``threads`` at a time in each of a set of threaded actors,
        each actor asking the task's GPU share and ``threads`` times its CPUs and memory."""
        return TaskPool(self, fn, resources) if threads <= 1 else _ActorPool(self, fn, threads, resources)

    def _opts(self) -> dict[str, Any]:
        opts = {"num_cpus": 1, "max_retries": self.max_retries, **({"max_calls": self.max_calls} if self.max_calls else {})}
        # workers of a cluster (or of a Ray started before these were set) do not inherit them
        env = {k: os.environ[k] for k in (faults.ENV, DECODE_LOG_ENV) if os.environ.get(k)}
        if env:
            opts["runtime_env"] = {"env_vars": env}
        return opts

    def as_completed(self, refs: list) -> Iterator[tuple[Any, Any]]:
        ray = self._ray
        left = list(refs)
        while left:
            done, left = ray.wait(left, num_returns=1)
            yield done[0], self._get(done[0])

    def _get(self, ref) -> Any:
        """The task's result, or a TaskFailure when it raised or its worker died past its retries."""
        try:
            return self._ray.get(ref)
        except Exception as e:  # noqa: BLE001 - RayTaskError, WorkerCrashedError, OutOfMemoryError, ...
            return TaskFailure.of(e)

    def close(self) -> None:
        if self._started:
            self._ray.shutdown()


def make_executor(kind: str, num_cpus: int | None = None):
    if kind == "local":
        return LocalExecutor()
    if kind == "ray":
        return RayExecutor(num_cpus=num_cpus)
    raise ValueError(f"unknown executor {kind!r}; use 'ray' or 'local'")
