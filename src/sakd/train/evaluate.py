"""Held-out evaluation during training: bits per byte of the raw and EMA student, and the distillation loss;
before training, the bits per byte of both models."""

from __future__ import annotations

import logging
from typing import Any

import torch

from sakd.data.batch import Batch
from sakd.data.loader import WindowLoader
from sakd.data.tokenize import input_format
from sakd.eval.metrics import lm_sums, metrics_from_sums
from sakd.models.head import model_head
from sakd.models.load import unwrap
from sakd.train.collective import global_sums
from sakd.train.rows import LossNorm, TokenCounts
from sakd.train.sharding import is_sharded
from sakd.train.step import Training, prepare_batch

log = logging.getLogger("sakd")
# Enough text for a stable comparison, little enough that it costs seconds before a run.
BEFORE_TRAINING_WINDOWS = 16


def eval_batches(windows, batch_size: int, student_tok, teacher_tok) -> list[Batch]:
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
    chunk = objective.chunking.rows(model_head(model))
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
                loss, parts = objective(model, b, point, LossNorm(counts, 1, len(batches)))
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


@torch.no_grad()
def measure_before_training(
    t: Training, windows, batch_size: int, student_tok, teacher_tok, writer
) -> dict[str, Any] | None:
    """Held-out bits per byte of the teacher (when one is loaded) and of the student before any step, on the
    first `BEFORE_TRAINING_WINDOWS` evaluation windows, each model on its own tokenization of the same text.
    Writes and returns the `before_training` record of metrics.jsonl (None without held-out data), logs both
    numbers, and a warning when the teacher is not better than the student."""
    batches = eval_batches(windows[:BEFORE_TRAINING_WINDOWS], batch_size, student_tok, teacher_tok)
    if not batches:
        return None
    accelerator = t.accelerator
    count = min(len(windows), BEFORE_TRAINING_WINDOWS)
    record: dict[str, Any] = {"event": "before_training", "step": 0, "windows": count}
    models = {"teacher": t.teacher} if t.teacher is not None else {}
    models["student"] = unwrap(t.student)
    sharded = any(is_sharded(m) for m in models.values())
    mine, keep = _share(batches, accelerator, sharded)
    for side, model in models.items():
        chunk = t.objective.chunking.rows(model_head(model))
        sums = lm_sums(model, mine, side, accelerator.device, chunk, None, keep)
        record[side] = metrics_from_sums(global_sums(sums, accelerator))
    writer.log(record)
    if accelerator.is_main_process:
        _log_before_training(record)
    return record


def _log_before_training(record: dict[str, Any]) -> None:
    student = record["student"]["bits_per_byte"]
    if "teacher" not in record:
        log.info(
            "before training: student %.4f bits per byte (held-out, %d windows)", student, record["windows"]
        )
        return
    teacher = record["teacher"]["bits_per_byte"]
    log.info(
        "before training: teacher %.4f bits per byte, student %.4f bits per byte (held-out, %d windows)",
        teacher,
        student,
        record["windows"],
    )
    if not teacher < student:
        log.warning(
            "WARNING: the teacher (%.4f bits per byte) is not better than the student (%.4f) on held-out "
            "data: distillation from it will likely make the student worse",
            teacher,
            student,
        )
