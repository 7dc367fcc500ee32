"""`sakd eval`: held-out perplexity and bits per byte of a student (and a teacher) on any text source."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from sakd.data.corpus import build_windows
from sakd.data.loader import WindowLoader
from sakd.errors import UserError
from sakd.eval.metrics import lm_metrics
from sakd.models.load import count_parameters, load_model, load_tokenizer


def evaluate_model(
    model_ref: str,
    role: str,
    sources: list,
    max_length: int = 256,
    batch_size: int = 8,
    max_windows: int | None = None,
    device: str | None = None,
) -> dict[str, Any]:
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tokenizer = load_tokenizer(model_ref, role)
    model = load_model(model_ref, role, torch.float32).to(dev)
    windows = build_windows(sources, tokenizer, None, max_length, max_windows)
    if not windows:
        raise UserError(f"the evaluation data gives no window of tokens for the {role}: use more text")
    loader = WindowLoader(
        windows, batch_size, seed=0, shuffle=False, drop_last=False, student_pad_id=tokenizer.pad_token_id
    )
    metrics = lm_metrics(model, loader, "student", dev)
    metrics["parameters"] = count_parameters(model)
    metrics["windows"] = len(windows)
    return metrics


def run_eval(
    student: str, teacher: str | None, sources: list, output: str | None, **kwargs
) -> dict[str, Any]:
    result: dict[str, Any] = {
        "data": [str(s) for s in sources],
        "student": evaluate_model(student, "student", sources, **kwargs),
    }
    if teacher:
        result["teacher"] = evaluate_model(teacher, "teacher", sources, **kwargs)
        result["compression_ratio"] = result["teacher"]["parameters"] / result["student"]["parameters"]
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(json.dumps(result, indent=1))
    return result
