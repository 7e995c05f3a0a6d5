"""Reference log-probs, computed once and cached with the data (RLAIF-V's practice; TRL refuses it for VLMs).

The reference is the starting policy: the SFT model, or with LoRA the same model with its adapters
off. So the cache is computed with the policy engine itself before its first update (eval mode, no
grad, adapters disabled): no second model is ever held in memory. Ranks split the items, then sum
their slices; every rank runs the same number of forwards (ZeRO-3 gathers parameters collectively).

File: <cache_dir>/<key>.safetensors with sum, count, wsum (n_items, K) float64; the key hashes the
checkpoint's fingerprint (training.model.fingerprint: the files loading reads; an adapter's base too)
and (name, size, modification time) the data files, the image files the rows name, and the encoding settings, so a
changed input computes a fresh cache and an unchanged rerun loads it without a forward.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from training.config import REF_CACHE_FOLDER
from training.dpo.forward import adapters_disabled, response_logps, target_counts
from training.engine.loop import rank_batches, stand_in_batch
from training.files import save_tensors
from training.model.builder import eval_mode
from training.model.fingerprint import model_fingerprint


def _stat(f: Path) -> list:
    st = f.stat()
    return [str(f.resolve()), st.st_size, st.st_mtime_ns]


def data_fingerprint(path: str) -> list:
    """A data file, or every file under a folder of shards; a Hub dataset id stands for itself."""
    p = Path(path)
    if p.is_file():
        return _stat(p)
    if p.is_dir():
        return [_stat(f) for f in sorted(p.rglob("*")) if f.is_file() and REF_CACHE_FOLDER not in f.parts]
    return [path]


def images_fingerprint(records, root: str) -> list:
    """The image files the records name (preference records keep resolved paths; OPA's rows paths under root,
    by default their file's folder, as OPADataset reads them); images kept as bytes are inside the data files."""
    def under(r) -> str:
        where = r.get("_where") if isinstance(r, dict) else None
        return root or (os.path.dirname(os.path.abspath(where.file)) if where is not None else "")

    srcs = ((under(r), src) for r in records for src in ((r.get("image"),) if isinstance(r, dict) else r.images))
    files = {os.path.join(d, s) for d, s in srcs if isinstance(s, str)}  # joining an absolute path keeps it
    return [_stat(Path(f)) for f in sorted(files) if os.path.isfile(f)]


def cache_key(checkpoint: str, data_paths: list[str], settings: dict, records=(), image_root: str = "") -> str:
    blob = json.dumps({"model": model_fingerprint(checkpoint), "data": [data_fingerprint(d) for d in data_paths],
                       "images": images_fingerprint(records, image_root), "settings": settings},
                      sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def default_cache_dir(data_paths: list[str], output_dir: str) -> Path:
    """Beside the (first) data file when that directory is writable, else in the output directory."""
    first = Path(data_paths[0])
    if first.exists() and os.access(first.parent, os.W_OK):
        return first.parent / REF_CACHE_FOLDER
    return Path(output_dir) / REF_CACHE_FOLDER


class RefCache:
    def __init__(self, sum_: torch.Tensor, count: torch.Tensor, wsum: torch.Tensor, path: Path | None = None):
        self.sum, self.count, self.wsum, self.path = sum_, count, wsum, path

    def lookup(self, indices: list[int], device, K: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        idx = torch.tensor(indices)
        return tuple(t[idx, :K].to(device=device, dtype=torch.float32) for t in (self.sum, self.count, self.wsum))

    def check(self, indices: list[int], count: torch.Tensor) -> None:
        """The cached token counts of these items must be the batch's: a cache whose key missed a change (a
        file edited within the same second and size, a Hub model changed outside the local cache) is refused, not
        used, where it changes a response's token count (the one check left: the log-probs themselves are not)."""
        cached, now = self.count[torch.tensor(indices), :count.shape[1]], count.detach().double().cpu()
        if not torch.equal(cached, now):
            k = int((cached != now).any(-1).nonzero()[0, 0])
            self._refuse(indices[k], cached[k], now[k])

    def check_all(self, strategy, make_batch, n: int, batch_size: int) -> None:
        """`check` of every item as the cache is loaded, the counts read from the batches' labels (no forward):
        a stale cache is refused before an optimizer step changes the weights or a checkpoint is written, and an
        item the run's steps would reach late (or never) is checked too. Ranks split the n dataset items and sum
        their counts, so every rank sees the same result."""
        now = torch.zeros_like(self.count)
        for idx in rank_batches(n, strategy.world_size, strategy.rank, batch_size):
            batch = make_batch(idx) if idx else None
            if batch is not None:  # every item a bad row: none counted, as none was when the cache was computed
                c = target_counts(batch).double().cpu()
                now[torch.tensor(batch.indices), :c.shape[1]] = c
        now = strategy.all_reduce(now)
        bad = (self.count != now).any(-1).nonzero()
        if len(bad):
            i = int(bad[0, 0])
            self._refuse(i, self.count[i], now[i], len(bad))

    def _refuse(self, item: int, cached: torch.Tensor, now: torch.Tensor, n_bad: int = 1) -> None:
        others = f" (and {n_bad - 1} other items')" if n_bad > 1 else ""
        raise ValueError(f"reference log-prob cache {self.path} does not belong to this data and model: item "
                         f"{item}'s response token counts{others} differ from the cached ones ({now.int().tolist()}, "
                         f"cached {cached.int().tolist()}); delete the file (it is computed anew) or pass another "
                         "--ref_cache_dir")

    @staticmethod
    def load_or_build(path: Path, strategy, engine, make_batch, n_items: int, K: int, batch_size: int,
                      rows_per_item: int = 1, progress: bool = False) -> "RefCache":
        """make_batch(list of dataset indices) -> a batch on the device (rows_per_item rows per index, whose
        batch.indices are the rows' cache indices), or None when every item was a bad row."""
        if path.exists():
            from safetensors.torch import load_file
            d = load_file(str(path))
            if tuple(d["sum"].shape) == (n_items, K):
                cache = RefCache(d["sum"], d["count"], d["wsum"], path)
                cache.check_all(strategy, make_batch, n_items // rows_per_item, batch_size)
                if strategy.is_main:
                    print(f"reference log-probs: loaded {path}")
                return cache
            if strategy.is_main:  # cannot belong to this data: computed anew and replaced
                print(f"reference log-probs: {path} holds {tuple(d['sum'].shape)}, not ({n_items}, {K}): computing")
        acc = torch.zeros(3, n_items, K, dtype=torch.float64)
        batches = list(rank_batches(n_items // rows_per_item, strategy.world_size, strategy.rank, batch_size))
        was_training = engine.training
        eval_mode(engine)
        from tqdm import tqdm
        bar = tqdm(total=len(batches), desc="reference log-probs", unit="batch", disable=not progress,
                   dynamic_ncols=True)
        with torch.no_grad(), adapters_disabled(engine):
            for idx in batches:
                batch = make_batch(idx) if idx else None
                fill = batch is None
                if fill:  # keep the collective forward count equal across ranks
                    batch = stand_in_batch(make_batch, n_items // rows_per_item)
                r = response_logps(engine, batch)
                if not fill:
                    k = r.sum.shape[1]
                    ii = torch.tensor(batch.indices)
                    for j, t in enumerate((r.sum, r.count, r.wsum)):
                        acc[j, ii, :k] = t.double().cpu()
                bar.update(1)
        bar.close()
        engine.train(was_training)
        if strategy.world_size > 1:
            acc = strategy.all_reduce(acc.to(strategy.device)).cpu()
        if strategy.is_main:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            save_tensors({"sum": acc[0].contiguous(), "count": acc[1].contiguous(), "wsum": acc[2].contiguous()}, tmp)
            os.replace(tmp, path)
            print(f"reference log-probs: computed for {n_items} items -> {path}")
        strategy.barrier()
        return RefCache(acc[0], acc[1], acc[2], path)
