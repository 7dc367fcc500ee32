"""`sakd cache-teacher`: run the teacher once over the training windows and store its top-k distributions.

Every teacher position of every training window is stored (not only the aligned positions of the config's
student): any student tokenizer's aligned positions are teacher positions, so one cache serves them all.
The windows (hence the teacher's contexts) are the ones training builds for the config's student.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from sakd.cache.keys import keyed_windows
from sakd.cache.store import CacheWriter, capture_settings, vocab_hash
from sakd.config import Config
from sakd.data.batch import Batch
from sakd.data.packing import collate_windows
from sakd.data.tokenize import input_format, log_input_format
from sakd.errors import UserError
from sakd.losses.chunked import chunk_rows
from sakd.models.attention import attention_implementation
from sakd.models.head import ModelHead, as_head, check_head, head_logits, model_head
from sakd.models.load import (
    freeze,
    load_model,
    load_tokenizer,
    resolve_precision,
    weights_dtype,
)
from sakd.train.teacher import teacher_pass

log = logging.getLogger("sakd")
PROBS_DTYPES = {"float16": torch.float16, "float32": torch.float32}


def cache_path(cfg: Config) -> Path:
    """Where the teacher cache of a config lives: `teacher.cache`, else `<output_dir>/teacher-cache`."""
    if cfg.teacher is not None and cfg.teacher.cache:
        return Path(cfg.teacher.cache).expanduser()
    return Path(cfg.output_dir) / "teacher-cache"


def data_sources(cfg: Config) -> list:
    return [s if isinstance(s, str) else s.model_dump(mode="json") for s in cfg.data.train]


def top_k_rows(
    hidden: torch.Tensor,
    head: ModelHead | torch.Tensor,
    bias: torch.Tensor | None,
    vocab_size: int,
    top_k: int,
    chunk_size: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The teacher's next-token distribution at temperature 1 over its tokenizer's ids, top-k only.

    hidden (n, H) final hidden states; head: the teacher's `ModelHead` (its logit transform applied), or a bare
    weight (V_model, H) with `bias`. Returns ids (n, k) int64 and
    probs (n, k) fp32 (descending), tail (n,) fp32 = 1 - sum of the top-k (0 when k covers the vocabulary).
    Logits are computed the way the live objective computes them (in the head's dtype, then fp32).
    """
    head = as_head(head, bias)
    ids, probs, tails = [], [], []
    for start in range(0, hidden.shape[0], chunk_size):
        logits = head_logits(hidden[start : start + chunk_size].to(head.weight.dtype), head)
        p = torch.softmax(logits[:, :vocab_size], dim=-1)  # (n, V)
        top = p.topk(top_k, dim=-1)
        tail = (1.0 - top.values.sum(-1)).clamp_min(0.0)
        if top_k >= vocab_size:
            tail = torch.zeros_like(tail)
        ids.append(top.indices)
        probs.append(top.values)
        tails.append(tail)
    if not ids:
        empty = hidden.new_zeros((0, top_k))
        return empty.long(), empty.float(), hidden.new_zeros(0).float()
    return torch.cat(ids), torch.cat(probs), torch.cat(tails)


def _check_capture_arguments(cfg: Config, top_k: int, shard_windows: int, probs_dtype: str) -> None:
    if cfg.teacher is None:
        raise UserError("cache-teacher needs a teacher: set teacher.model in the config")
    if top_k < 1:
        raise UserError(f"--top-k must be at least 1, got {top_k}")
    if shard_windows < 1:
        raise UserError(f"--shard-windows must be at least 1, got {shard_windows}")
    if probs_dtype not in PROBS_DTYPES:
        raise UserError(f"unknown probability dtype {probs_dtype!r}: choose one of {sorted(PROBS_DTYPES)}")


@dataclass(frozen=True)
class CaptureOptions:
    """How `capture_teacher_cache` captures: `top_k` ids per position, probabilities stored as `probs_dtype`,
    `shard_windows` windows per shard, `batch_size` windows per teacher forward (None: train.batch_size), on
    `device` (None: CUDA if present); `max_shards` stops after writing that many (an interrupted capture, for
    tests)."""

    top_k: int = 64
    batch_size: int | None = None
    shard_windows: int = 1024
    probs_dtype: str = "float16"
    device: str | None = None
    max_shards: int | None = None
    progress: bool = True


def capture_teacher_cache(
    cfg: Config, path: str | Path | None = None, options: CaptureOptions | None = None, **settings: Any
) -> dict[str, Any]:
    """Write (or continue) the teacher cache of `cfg` in `path` (None: the config's default place); returns a
    summary. `settings` override fields of `options` by name; re-running continues with the missing shards."""
    o = replace(options or CaptureOptions(), **settings)
    _check_capture_arguments(cfg, o.top_k, o.shard_windows, o.probs_dtype)
    t0 = time.perf_counter()
    root = Path(path).expanduser() if path else cache_path(cfg)
    student_tok = load_tokenizer(cfg.student.tokenizer_path, "student")
    teacher_tok = load_tokenizer(cfg.teacher.tokenizer_path, "teacher")
    top_k = min(o.top_k, len(teacher_tok))
    keyed = keyed_windows(cfg.data.train, student_tok, teacher_tok, cfg.data.max_length)
    windows = keyed.windows
    settings_record = capture_settings(
        cfg.teacher.model, teacher_tok, data_sources(cfg), cfg.data.max_length, keyed.data_fingerprint
    )
    layout = {
        "top_k": top_k,
        "probs_dtype": o.probs_dtype,
        "shard_windows": o.shard_windows,
        "num_windows": len(windows),
        "num_documents": keyed.num_documents,
        "capture_student_vocab": vocab_hash(student_tok),
    }
    num_shards = math.ceil(len(windows) / o.shard_windows)
    writer = CacheWriter(root, settings_record, layout, num_shards)
    todo = [i for i in range(num_shards) if not writer.done(i)]
    if o.max_shards is not None:
        todo = todo[: o.max_shards]
    if todo:
        runner = _TeacherRunner(cfg, o, (student_tok, teacher_tok), windows, top_k)
        total = sum(min(o.shard_windows, len(windows) - i * o.shard_windows) for i in todo)
        bar = tqdm(total=total, desc="caching the teacher", unit="window", disable=not o.progress)
        for index in todo:
            first, end = index * o.shard_windows, min((index + 1) * o.shard_windows, len(windows))
            tensors = runner.shard(windows, first, end, bar)
            keys = np.concatenate([keyed.window_keys(w) for w in range(first, end)])
            tensors["keys"] = torch.from_numpy(keys)
            if len(keys) != tensors["ids"].shape[0]:
                raise RuntimeError(f"shard {index}: {len(keys)} keys for {tensors['ids'].shape[0]} rows")
            writer.write(index, tensors, (first, end))
        bar.close()
    return {
        "path": str(root),
        **_shards_summary(writer.manifest),
        "num_shards": num_shards,
        "written_now": len(todo),
        "windows": len(windows),
        "top_k": top_k,
        "seconds": round(time.perf_counter() - t0, 2),
    }


class _TeacherRunner:
    """The loaded teacher, its head (checked against the model's own forward) and how it runs."""

    def __init__(self, cfg: Config, o: CaptureOptions, tokenizers: tuple[Any, Any], windows, top_k: int):
        dev = torch.device(o.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        precision = resolve_precision(cfg.train.precision, dev)
        teacher_dtype = cfg.teacher.dtype if cfg.teacher.dtype != "auto" else precision
        attn = attention_implementation(False, cfg.teacher.attn_implementation)
        self.teacher = freeze(
            load_model(cfg.teacher.model, "teacher", weights_dtype(teacher_dtype), attn)
        ).to(dev)
        self.head = model_head(self.teacher)
        self.autocast = (
            torch.autocast(dev.type, dtype=weights_dtype(precision)) if precision != "fp32" else nullcontext()
        )
        self.device, self.options, self.top_k = dev, o, top_k
        self.batch = o.batch_size or cfg.train.batch_size
        self.vocab_size = len(tokenizers[1])
        self.formats = input_format(tokenizers[0]), input_format(tokenizers[1])
        log_input_format(tokenizers[1], "teacher")
        probe = self._collate(windows[:1])
        check_head(self.teacher, probe.teacher.input_ids, probe.teacher.attention_mask, "teacher")
        chunk_logits = cfg.distill.chunk_logits_on(torch.device(dev).type)
        self.chunk = chunk_rows(cfg.distill.chunk_size, chunk_logits, *self.head.weight.shape)

    def _collate(self, windows) -> Batch:
        return collate_windows(windows, *self.formats).to(self.device)

    def shard(self, windows, first: int, end: int, bar) -> dict[str, torch.Tensor]:
        """The top-k rows of windows[first:end], every position of each window's own tokens in order."""
        parts: dict[str, list[torch.Tensor]] = {"ids": [], "probs": [], "tail": []}
        for start in range(first, end, self.batch):
            stop = min(start + self.batch, end)
            collated = self._collate(windows[start:stop])
            with torch.no_grad(), self.autocast:
                hidden = teacher_pass(self.teacher, collated).hidden  # (B, Lt, H)
                # (n, H) the windows' own tokens, window by window: not the prefix, not the padding
                rows = hidden[collated.teacher.group >= 0]
                ids, probs, tail = top_k_rows(rows, self.head, None, self.vocab_size, self.top_k, self.chunk)
            parts["ids"].append(ids.to(torch.int32).cpu())
            parts["probs"].append(probs.to(PROBS_DTYPES[self.options.probs_dtype]).cpu())
            parts["tail"].append(tail.float().cpu())
            bar.update(stop - start)
        return {k: torch.cat(v) for k, v in parts.items()}


def _shards_summary(manifest: dict[str, Any]) -> dict[str, Any]:
    rows = sum(s["rows"] for s in manifest["shards"].values())
    tails = [s.get("tail_sum") for s in manifest["shards"].values()]
    return {
        "complete": manifest["complete"],
        "shards": len(manifest["shards"]),
        "rows": rows,
        # the teacher's mean probability inside the stored top-k (None: not recorded)
        "top_k_mass": 1 - sum(tails) / rows if rows and None not in tails else None,
    }
