"""Held-out language-model metrics: per-token perplexity and bits per byte.

Perplexity is exp of the mean next-token cross-entropy over real target tokens (padding never counts).
Bits per byte divides the cross-entropy of every predicted token, EOS and each byte piece of a split
character included, by the UTF-8 bytes of the predicted text, so it compares models with different
tokenizers: a tokenizer that spends several tokens on one character pays for each of them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from sakd.data.batch import Batch
from sakd.losses import chunked_head_loss
from sakd.models.head import model_head
from sakd.models.load import capture_final_hidden


def bits_per_byte(nll_nats: float, nbytes: int) -> float:
    if nbytes <= 0:
        raise ValueError("no bytes to evaluate on")
    return nll_nats / (math.log(2) * nbytes)


def _nll_rows(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"nll": F.cross_entropy(logits.float(), labels, reduction="sum")}


@torch.no_grad()
def lm_metrics(
    model: nn.Module,
    batches: Iterable[Batch],
    side: str = "student",
    device: torch.device | None = None,
    chunk_size: int = 1024,
    progress: str | None = None,
) -> dict[str, float]:
    """Perplexity and bits per byte of `model` on the `side` ("student"/"teacher") tokens of `batches`;
    `progress`: the description of a progress bar (none when None)."""
    return metrics_from_sums(lm_sums(model, batches, side, device, chunk_size, progress))


def metrics_from_sums(sums: dict[str, float]) -> dict[str, float]:
    """Loss, perplexity and bits per byte from the sums of `lm_sums` (added up over processes, if any)."""
    nll, tokens = sums["nll"], int(sums["tokens"])
    if tokens == 0:
        raise ValueError("no target tokens to evaluate on")
    return {
        "loss": nll / tokens,
        "perplexity": _exp_or_inf(nll / tokens),
        "bits_per_byte": bits_per_byte(nll, int(sums["bytes"])),
        "tokens": tokens,
        "bytes": int(sums["bytes"]),
    }


@torch.no_grad()
def lm_sums(
    model: nn.Module,
    batches: Iterable[Batch],
    side: str = "student",
    device: torch.device | None = None,
    chunk_size: int = 1024,
    progress: str | None = None,
    keep: list[bool] | None = None,
) -> dict[str, float]:
    """Summed cross-entropy of all targets, their count and their bytes over `batches`; a batch whose
    `keep` entry is False runs but is not counted (a sharded model's processes must run equally many)."""
    was_training = model.training
    model.eval()
    nll = 0.0
    tokens = nbytes = 0
    for i, batch in enumerate(tqdm(batches, desc=progress, leave=False, disable=progress is None)):
        model_side = batch.side(side)
        ids = model_side.input_ids.to(device) if device else model_side.input_ids
        attn = model_side.attention_mask.to(ids.device)
        labels = model_side.labels.to(ids.device)
        target_bytes = model_side.target_bytes.to(ids.device)
        with capture_final_hidden(model) as out:
            model(input_ids=ids, attention_mask=attn, logits_to_keep=1, use_cache=False)
        head = model_head(model)  # after the forward: a sharded model's head is whole only then
        rows = labels != -100
        _, parts = chunked_head_loss(
            out["hidden"][rows],
            head,
            _nll_rows,
            [labels[rows]],
            {},
            chunk_size=chunk_size,
        )
        if keep is not None and not keep[i]:
            continue
        nll += float(parts["nll"])
        tokens += int(rows.sum())
        nbytes += int(target_bytes[rows].sum())
    model.train(was_training)
    return {"nll": nll, "tokens": tokens, "bytes": nbytes}


def _exp_or_inf(x: float) -> float:
    """Perplexity without a cap: a diverged model's perplexity is reported as inf, never a clamped number."""
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf
