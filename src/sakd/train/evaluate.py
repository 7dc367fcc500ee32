"""Held-out evaluation during training: bits per byte of the raw and EMA student, and the distillation loss."""

from __future__ import annotations

from typing import Any

import torch

from sakd.data.loader import WindowLoader
from sakd.data.tokenize import input_format
from sakd.eval.metrics import lm_sums, metrics_from_sums
from sakd.models.head import model_head
from sakd.models.load import unwrap
from sakd.train.collective import global_sums
from sakd.train.rows import TokenCounts
from sakd.train.sharding import is_sharded
from sakd.train.step import prepare_batch


def eval_batches(windows, batch_size: int, student_tok, teacher_tok) -> list[dict[str, torch.Tensor]]:
    if not windows:
        return []
    loader = WindowLoader(
        windows,
        batch_size,
        seed=0,
        shuffle=False,
        drop_last=False,
        student=input_format(student_tok),
        teacher=input_format(teacher_tok),
    )
    return list(loader)


def _share(batches: list, accelerator, sharded: bool) -> tuple[list, list[bool]]:
    """This process's batches (every num_processes-th); a sharded model's processes must all run as many
    forwards, so the short ones repeat a batch that is not counted."""
    n, rank = accelerator.num_processes, accelerator.process_index
    mine = batches[rank::n]
    keep = [True] * len(mine)
    if sharded and batches:
        extra = -(-len(batches) // n) - len(mine)
        mine, keep = mine + [batches[0]] * extra, keep + [False] * extra
    return mine, keep


@torch.no_grad()
def evaluate_student(
    student, teacher, objective, batches, point, accelerator, ema, progress: bool = False
) -> dict[str, Any]:
    """Held-out bits per byte and perplexity of the raw (and EMA) student, and the distillation loss with the
    same weights as training. Each process evaluates its share of the batches; the sums are added up."""
    model = unwrap(student)
    device = accelerator.device
    chunk = objective.rows_per_chunk(model_head(model))
    sharded = is_sharded(model) or (teacher is not None and is_sharded(teacher))
    mine, keep = _share(batches, accelerator, sharded)

    def metrics(desc: str) -> dict[str, float]:
        sums = lm_sums(model, mine, "student", device, chunk, desc if progress else None, keep)
        return metrics_from_sums(global_sums(sums, accelerator))

    result: dict[str, Any] = {"raw": metrics("evaluating (raw)")}
    if ema is not None:
        with ema.applied(model):
            result["ema"] = metrics("evaluating (EMA)")
    if teacher is not None and point.weights["kd"] > 0:
        model.eval()
        counts = TokenCounts.of(batches)  # of all processes' batches: the parts are shares of the whole
        sums: dict[str, float] = {"distill_loss": 0.0}
        for b, counted in zip(mine, keep, strict=True):
            b = prepare_batch(b, device)
            with accelerator.autocast():
                loss, parts = objective(model, teacher, b, point, counts, micro_batches=len(batches))
            if counted:
                sums["distill_loss"] += float(loss)
                for k, v in parts.items():
                    sums[k] = sums.get(k, 0.0) + float(v)
        model.train()
        sums = global_sums(sums, accelerator)
        result["distill_loss"] = sums.pop("distill_loss")
        result["kd"] = sums["kd"]
        result["parts"] = sums
    result["best"] = (
        "ema"
        if "ema" in result and result["ema"]["bits_per_byte"] < result["raw"]["bits_per_byte"]
        else "raw"
    )
    result["best_bits_per_byte"] = result[result["best"]]["bits_per_byte"]
    return result
