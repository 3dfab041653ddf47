"""PyTorch loading of M2F-D shards: fixed-length training windows with DDP rank and DataLoader
worker splitting, per-epoch shuffling, and equal sample counts on every rank."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from extractors.shards import iter_shard


def load_entries(root: str | Path | None = None, split: str | None = "train", subset: str | Path | None = None) -> tuple[Path, list[dict]]:
    """(dataset root, [{clip_id, shard, index_in_shard, n_frames, split}]) from the dataset's samples
    table, or from a subset manifest written by `m2fd subset`."""
    if subset is not None:
        man = json.loads(Path(subset).read_text())
        root = Path(man["dataset"])
        entries = man["samples"]
    else:
        from storage_schemas import open_dataset

        root = Path(root)
        ds = open_dataset(root)
        where = f"where split = '{split}'" if split else ""
        entries = ds.query(f"select clip_id, shard, index_in_shard, n_frames, split from samples {where} "
                           f"order by shard, index_in_shard").to_pylist()
    return root, entries


_NEEDED = ("latents.npy", "pose.npy", "audio_feat.npy", "mask.npy")
_NPY_HDR = __import__("re").compile(r"\{'descr': '([^']+)', 'fortran_order': False, 'shape': \(([0-9, ]*)\), \}")


def _npy(b: bytes) -> np.ndarray:
    """Parse a plain .npy (no pickle) without the generic np.load machinery."""
    if b[:6] != b"\x93NUMPY":
        raise ValueError("not an .npy member")
    hl = int.from_bytes(b[8:10], "little") if b[6] == 1 else int.from_bytes(b[8:12], "little")
    off = 10 if b[6] == 1 else 12
    m = _NPY_HDR.match(b[off:off + hl].decode("latin1"))
    if m is None or "O" in m.group(1):
        raise ValueError("unsupported .npy layout (object, Fortran order or unknown header)")
    shape = tuple(int(x) for x in m.group(2).replace(" ", "").split(",") if x)
    return np.frombuffer(b, dtype=np.dtype(m.group(1)), offset=off + hl).reshape(shape)


def _u(*parts) -> int:
    return int(hashlib.sha256("/".join(map(str, parts)).encode()).hexdigest()[:15], 16)


class M2FDWindows(torch.utils.data.IterableDataset):
    """Yields one ``window``-frame training window per clip per epoch.

    Per epoch the clip list is permuted (seed, epoch), cut to a multiple of the world size and dealt
    round-robin to ranks, so every rank sees the same number of samples and no clip twice; within a
    rank, DataLoader workers take contiguous blocks of the rank's samples in shard order (few shards
    walked per worker) and read them in shard order. Windows start at
    a per-(seed, epoch, clip) offset; clips shorter than the window are zero-padded with ``mask`` false.

    ``batch_size``: the DataLoader's batch size, when it batches; worker blocks are then cut at whole
    batches, so only the last worker has a partial batch (each worker batches its own stream: blocks
    cut anywhere would leave up to one partial batch per worker, dropped with drop_last).
    """

    def __init__(self, root: str | Path | None = None, split: str | None = "train", subset: str | Path | None = None,
                 window: int = 200, seed: int = 0, shuffle: bool = True, rank: int | None = None,
                 world_size: int | None = None, batch_size: int | None = None):
        super().__init__()
        self.root, self.entries = load_entries(root, split, subset)
        self.window, self.seed, self.shuffle = window, seed, shuffle
        self.batch_size = batch_size
        if rank is None or world_size is None:
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
            else:
                rank, world_size = 0, 1
        self.rank, self.world_size = rank, world_size
        # shared memory: persistent DataLoader workers (started once) read the epoch set here
        self._epoch = torch.multiprocessing.Value("q", 0, lock=False)

    @property
    def epoch(self) -> int:
        return int(self._epoch.value)

    def set_epoch(self, epoch: int) -> None:
        """Call before iterating an epoch; DataLoader workers, persistent ones included, follow."""
        self._epoch.value = int(epoch)

    def rank_entries(self) -> list[dict]:
        e = list(self.entries)
        if self.shuffle:
            e.sort(key=lambda x: _u(self.seed, self.epoch, x["clip_id"]))
        n = (len(e) // self.world_size) * self.world_size
        return e[self.rank:n:self.world_size]

    def __len__(self) -> int:
        return len(self.entries) // self.world_size

    def __iter__(self):
        mine = self.rank_entries()
        info = torch.utils.data.get_worker_info()
        if info is not None:
            # each worker takes a contiguous block of the rank's samples in (epoch-shuffled) shard order,
            # so it walks few shards instead of all of them (the shard walk is the loader's main cost)
            order = {sh: _u(self.seed, self.epoch, sh) if self.shuffle else sh for sh in {x["shard"] for x in mine}}
            mine = sorted(mine, key=lambda x: (order[x["shard"]], x["index_in_shard"]))
            bs = self.batch_size or 1
            cuts = np.linspace(0, len(mine) // bs, info.num_workers + 1).astype(int) * bs
            cuts[-1] = len(mine)  # the remainder (a partial batch) goes to the last worker
            mine = mine[cuts[info.id]:cuts[info.id + 1]]
        by_shard: dict[str, dict[int, dict]] = {}
        for x in mine:
            by_shard.setdefault(x["shard"], {})[x["index_in_shard"]] = x
        for shard in sorted(by_shard, key=lambda s: _u(self.seed, self.epoch, s) if self.shuffle else s):
            wanted = by_shard[shard]
            for i, (key, members) in enumerate(iter_shard(self.root / shard, only=_NEEDED)):
                if i not in wanted:
                    continue
                if key != wanted[i]["clip_id"]:
                    raise ValueError(f"{shard}: member {i} is {key!r}, the index says {wanted[i]['clip_id']!r}")
                yield self._window({k: _npy(members[f"{k}.npy"]) for k in ("latents", "pose", "audio_feat", "mask")}, key)
                del wanted[i]
                if not wanted:
                    break
            if wanted:
                raise ValueError(f"{shard}: samples {sorted(wanted)} listed in the index are missing")

    def _window(self, s: dict, key: str) -> dict:
        n = len(s["latents"])
        w = self.window
        start = _u(self.seed, self.epoch, key, "start") % (n - w + 1) if (self.shuffle and n > w) else 0
        sl = slice(start, start + w)

        def cut(a):
            a = a[sl]
            if len(a) < w:
                pad = np.zeros((w - len(a),) + a.shape[1:], a.dtype)
                a = np.concatenate([a, pad])
            return torch.from_numpy(np.array(a, copy=True))

        valid = np.zeros(w, bool)
        valid[: min(w, n - start)] = True
        return {"clip_id": key, "start": start, "latents": cut(s["latents"]), "pose": cut(s["pose"]),
                "audio_feat": cut(s["audio_feat"]), "mask": torch.from_numpy(valid & cut(s["mask"]).numpy())}
