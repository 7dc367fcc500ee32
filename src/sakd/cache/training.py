"""Training from a teacher cache: join the cache to the training windows and attach cached rows to batches.

Each aligned group of a training window looks its teacher distribution up by the key of the group's last
teacher token (`sakd.cache.keys`). Groups without a cached entry (text the capture never saw in a window, a
student cut where the capture's windows dropped an over-long group) are not distilled: `attach` removes them
from the batch's alignment mask, so they count nowhere, and `coverage` says how many there are.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from sakd.cache.keys import KeyedWindows, keyed_windows, lookup_rows, same_windows
from sakd.cache.store import TeacherCache, capture_settings
from sakd.data.batch import Batch, CachedTargets
from sakd.data.packing import Window, group_last_positions
from sakd.errors import UserError
from sakd.models.gguf import pretrained_args

log = logging.getLogger("sakd")


class CachedTeacher:
    """The cache joined to training windows: `group_rows[w]` (G_w,) int64 is the cache row of each
    alignment group of window w (-1: not cached)."""

    def __init__(self, cache: TeacherCache, group_rows: list[np.ndarray]):
        self.cache = cache
        self.group_rows = group_rows
        aligned = sum(max(len(r) - 1, 0) for r in group_rows)  # a window's last group is never distilled
        covered = sum(int((r[:-1] >= 0).sum()) for r in group_rows)
        self.coverage = {
            "path": str(cache.root),
            "top_k": cache.top_k,
            "aligned_positions": aligned,
            "cached_positions": covered,
            "coverage": covered / aligned if aligned else 0.0,
        }

    def attach(self, batch: Batch) -> Batch:
        """The batch with its `CachedTargets` at its aligned groups (`ids` (B, G, k) int64, `probs` (B, G, k)
        fp32, `tail` (B, G) fp32) and its alignment mask (B, G) narrowed to the groups found in the cache."""
        mask = batch.alignment.mask  # (B, G)
        b, g = mask.shape
        rows = np.full((b, g), -1, dtype=np.int64)
        for i, w in enumerate(batch.window_index.tolist()):
            found = self.group_rows[w][:g]
            rows[i, : len(found)] = found
        keep = mask & torch.from_numpy(rows >= 0)
        ids, probs, tail = self.cache.gather(rows[keep.numpy()])
        k = self.cache.top_k
        cache = CachedTargets(
            torch.zeros((b, g, k), dtype=torch.int64),
            torch.zeros((b, g, k), dtype=torch.float32),
            torch.zeros((b, g), dtype=torch.float32),
        )
        cache.ids[keep], cache.probs[keep], cache.tail[keep] = ids, probs, tail
        # loss rows made before the narrowing would name groups that are no longer distilled
        return replace(batch, alignment=replace(batch.alignment, mask=keep), cache=cache, rows=None)

    def batches(self, loader) -> CachedBatches:
        return CachedBatches(loader, self)


class CachedBatches:
    """A `WindowLoader` whose batches carry cached teacher rows; its position is the loader's."""

    def __init__(self, loader, cached: CachedTeacher):
        self.loader = loader
        self.cached = cached

    def next_batch(self) -> Batch:
        return self.cached.attach(self.loader.next_batch())

    def __iter__(self) -> Iterator[Batch]:
        for batch in self.loader:
            yield self.cached.attach(batch)

    def __len__(self) -> int:
        return len(self.loader)

    def state_dict(self) -> dict[str, Any]:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loader, name)


def open_training_cache(
    path: str | Path,
    windows: list[Window],
    sources: Sequence,
    max_length: int,
    teacher_model: str,
    student_tokenizer,
    teacher_tokenizer,
    keyed: KeyedWindows | None = None,
) -> CachedTeacher:
    """Open the cache at `path` for the training `windows` (built from `sources` with these tokenizers and
    `max_length`): a UserError if it is missing, incomplete or was captured with other settings. `keyed`:
    the `keyed_windows` that gave `windows` (None: the sources are tokenized again to key them)."""
    plain_sources = [s if isinstance(s, str) else s.model_dump(mode="json") for s in sources]
    checked = keyed is not None and keyed.windows is windows
    if not checked:
        keyed = keyed_windows(sources, student_tokenizer, teacher_tokenizer, max_length)
    settings = capture_settings(
        teacher_model, teacher_tokenizer, plain_sources, max_length, keyed.data_fingerprint
    )
    cache = TeacherCache.open(path, settings)
    if not checked and not same_windows(keyed.windows, windows):
        raise UserError("the training windows differ from the windows the teacher cache was keyed for")
    stream_rows = lookup_rows(cache.keys(), keyed.teacher_keys)  # (N_t,)
    group_rows = [
        stream_rows[start + group_last_positions(w.teacher_group)]
        for start, w in zip(keyed.teacher_starts, windows, strict=True)
    ]
    cached = CachedTeacher(cache, group_rows)
    c = cached.coverage
    log.info(
        "teacher cache %s: top-%d distributions for %d of %d aligned positions (coverage %.1f%%)",
        c["path"],
        c["top_k"],
        c["cached_positions"],
        c["aligned_positions"],
        100 * c["coverage"],
    )
    return cached


def teacher_skeleton(ref: str) -> nn.Module:
    """The teacher's module structure without weights (meta device): enough to size the distillation heads
    when the teacher itself is not loaded."""
    name, gguf = pretrained_args(ref)
    try:
        config = AutoConfig.from_pretrained(name, **gguf)
    except (OSError, ValueError) as e:
        raise UserError(
            f"cannot read the teacher config from '{ref}' ({type(e).__name__}): check teacher.model"
        ) from None
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)
