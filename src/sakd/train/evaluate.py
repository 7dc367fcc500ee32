"""Held-out evaluation during training: bits per byte of the raw and EMA student, and the distillation loss."""

from __future__ import annotations

from typing import Any

import torch

from sakd.data.loader import WindowLoader
from sakd.eval.metrics import lm_metrics
from sakd.models.load import lm_head, unwrap
from sakd.train.objective import TokenCounts
from sakd.train.step import to_device


def eval_batches(windows, batch_size: int, student_tok, teacher_tok) -> list[dict[str, torch.Tensor]]:
    if not windows:
        return []
    loader = WindowLoader(
        windows,
        batch_size,
        seed=0,
        shuffle=False,
        drop_last=False,
        student_pad_id=student_tok.pad_token_id,
        teacher_pad_id=teacher_tok.pad_token_id if teacher_tok else None,
    )
    return list(loader)


@torch.no_grad()
def evaluate_student(
    student, teacher, objective, batches, point, accelerator, ema, progress: bool = False
) -> dict[str, Any]:
    """Held-out bits per byte and perplexity of the raw (and EMA) student, and the distillation loss with the
    same weights as training."""
    model = unwrap(student)
    device = accelerator.device
    chunk = objective.rows_per_chunk(lm_head(model))
    result: dict[str, Any] = {
        "raw": lm_metrics(model, batches, "student", device, chunk, "evaluating (raw)" if progress else None)
    }
    if ema is not None:
        with ema.applied(model):
            result["ema"] = lm_metrics(
                model, batches, "student", device, chunk, "evaluating (EMA)" if progress else None
            )
    if teacher is not None and point.weights["kd"] > 0:
        model.eval()
        moved = [to_device(b, device) for b in batches]
        counts = TokenCounts.of(moved)
        total = 0.0
        parts_sum: dict[str, float] = {}
        for b in moved:
            with accelerator.autocast():
                loss, parts = objective(model, teacher, b, point, counts, micro_batches=len(moved))
            total += float(loss)
            for k, v in parts.items():
                parts_sum[k] = parts_sum.get(k, 0.0) + float(v)
        model.train()
        result["distill_loss"] = total
        result["kd"] = parts_sum["kd"]
        result["parts"] = parts_sum
    result["best"] = (
        "ema"
        if "ema" in result and result["ema"]["bits_per_byte"] < result["raw"]["bits_per_byte"]
        else "raw"
    )
    result["best_bits_per_byte"] = result[result["best"]]["bits_per_byte"]
    return result
