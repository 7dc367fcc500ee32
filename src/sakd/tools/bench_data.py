"""`sakd bench` part (c): the data pipeline's token rate."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from sakd.data.corpus import build_windows
from sakd.models.load import load_tokenizer
from sakd.tools.bench_step import StepSizes, pair_loader


def run_data_bench(assets: dict[str, Path], sizes: StepSizes) -> dict[str, Any]:
    """Windows/s and tokens/s of dual tokenization + alignment + packing (build_windows) and collation (one
    epoch of WindowLoader) for the cross-tokenizer pair; tokens are student tokens, as in training."""
    student_tok = load_tokenizer(str(assets["student_b"]), "student")
    teacher_tok = load_tokenizer(str(assets["teacher_a"]), "teacher")
    start = time.perf_counter()
    windows = build_windows([assets["corpus"]], student_tok, teacher_tok, sizes.max_length)
    packed = time.perf_counter()
    loader = pair_loader(windows, sizes.batch_size, student_tok, teacher_tok, drop_last=False)
    batches = sum(1 for _ in loader)
    end = time.perf_counter()
    tokens = sum(len(w.student_ids) for w in windows)
    return {
        "windows": len(windows),
        "batches": batches,
        "student_tokens": tokens,
        "teacher_tokens": sum(len(w.teacher_ids) for w in windows),
        "tokenize_align_pack_s": packed - start,
        "collate_s": end - packed,
        "windows_per_s": len(windows) / (end - start),
        "tokens_per_s": tokens / (end - start),
        "collate_tokens_per_s": tokens / max(end - packed, 1e-9),
    }
