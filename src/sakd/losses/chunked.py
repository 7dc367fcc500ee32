"""The one chunking mechanism: LM-head losses without a full (tokens x vocab) logits tensor.

`chunked_head_loss` computes the logits of `chunk_size` rows at a time, evaluates the row loss on them and
immediately turns d(total)/d(logits) into gradients for the hidden states, the head weight and bias (as Liger
Kernel's fused linear cross-entropy does). Only those gradients are kept for backward, so peak memory is
O(chunk_size x V) instead of O(N x V) and the logits are computed once. `full_head_loss` is the plain
reference it is tested against. The logits are the model's own: the head's logit transform (a scale, a
soft-cap; `sakd.models.head`) is applied to them, and d(total)/d(logits) is chained back through it.

A row loss maps (logits (n, V) fp32, *row_chunks) to {part name: scalar SUM over the n rows}; parts are sums
so that chunks add up and the caller divides by its global count of valid tokens.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from sakd.models.head import ModelHead, as_head, head_logits

RowLoss = Callable[..., dict[str, torch.Tensor]]


def _weighted_total(parts: dict[str, torch.Tensor], part_weights: dict[str, float]) -> torch.Tensor | None:
    """sum of weight * part over the nonzero weights (a zero-weight part, even inf, only gets logged)."""
    missing = [name for name, weight in part_weights.items() if weight != 0 and name not in parts]
    if missing:
        raise ValueError(f"part_weights weight {missing} but the row loss returned only {sorted(parts)}")
    terms = [weight * parts[name] for name, weight in part_weights.items() if weight != 0]
    return sum(terms[1:], terms[0]) if terms else None


class ChunkBuffers:
    """The (rows x vocabulary) tensors of a chunk, kept from chunk to chunk and from step to step: the logits
    and their gradient. On CPU a fresh tensor that size is fresh pages from the kernel, and the page faults of
    filling them cost about as much as the head's matmul; CUDA's caching allocator already reuses its memory,
    so no buffers are kept there (`get` gives None)."""

    def __init__(self):
        self._kept: dict[str, torch.Tensor] = {}

    def get(self, name: str, rows: int, columns: int, dtype: torch.dtype, device: torch.device):
        """An uninitialised (rows, columns) tensor (rows of the one kept under `name`), or None off the CPU."""
        if device.type != "cpu":
            return None
        kept = self._kept.get(name)
        if kept is None or kept.shape[0] < rows or kept.shape[1] != columns or kept.dtype != dtype:
            kept = self._kept[name] = torch.empty((rows, columns), dtype=dtype)
        return kept[:rows]


class _AttachGrads(torch.autograd.Function):
    """Returns `total` unchanged; its backward hands out the precomputed gradients scaled by grad_output."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        total: torch.Tensor,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        grad_hidden: torch.Tensor | None,
        grad_weight: torch.Tensor | None,
        grad_bias: torch.Tensor | None,
    ) -> torch.Tensor:
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        return total.clone()

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_output: torch.Tensor) -> tuple:
        grads = [None if g is None else (grad_output * g).to(g.dtype) for g in ctx.saved_tensors]
        return None, *grads, None, None, None


# A chunk keeps at least hidden / this many rows: each chunk reads the whole (vocabulary x hidden) head weight
# for its products, and with few rows those products run several times slower per row (on a CPU, 8 rows of a
# 640-wide head cost 3.3x per row what 128 rows cost, 32 rows 1.4x). The products' share of a step grows with
# the hidden size, so the floor does too; with a narrow head the softmaxes dominate and small chunks cost
# little.
HIDDEN_PER_ROW = 8


def chunk_rows(chunk_size: int, chunk_logits: int | None, vocab: int, hidden: int = 0) -> int:
    """Rows per chunk: `chunk_size`, lowered so that a chunk's (rows x vocab) logits stay within
    `chunk_logits` (None: no bound), but not below hidden / `HIDDEN_PER_ROW` (the widest head's hidden size;
    0: no floor); at least 1."""
    if chunk_logits is None:
        return max(1, chunk_size)
    floor = min(chunk_size, hidden // HIDDEN_PER_ROW)
    return max(1, floor, min(chunk_size, chunk_logits // max(vocab, 1)))


def _chunk_loss(
    row_loss: RowLoss,
    logits: torch.Tensor,
    chunk_inputs: list[torch.Tensor],
    part_weights: dict[str, float],
    kwargs: dict,
    train: bool,
) -> tuple[dict[str, torch.Tensor], torch.Tensor | None, torch.Tensor | None]:
    """A chunk's parts, their weighted total (None: every weight 0) and d(total)/d(logits) (None when not
    training): in closed form from a fused row loss's `with_grad`, else by autograd."""
    if train and hasattr(row_loss, "with_grad"):  # closed-form gradients (`sakd.losses.fused`)
        chunk_parts, grad_logits = row_loss.with_grad(logits.detach(), part_weights, *chunk_inputs, **kwargs)
        return chunk_parts, _weighted_total(chunk_parts, part_weights), grad_logits
    with torch.enable_grad() if train else torch.no_grad():
        chunk_parts = row_loss(logits, *chunk_inputs, **kwargs)
        chunk_total = _weighted_total(chunk_parts, part_weights)
    grad_logits = None
    if train and chunk_total is not None and chunk_total.requires_grad:
        (grad_logits,) = torch.autograd.grad(chunk_total, logits)
    return chunk_parts, chunk_total, grad_logits


def chunked_head_loss(
    hidden: torch.Tensor,
    head: ModelHead | torch.Tensor,
    row_loss: RowLoss,
    row_inputs: Sequence[torch.Tensor],
    part_weights: dict[str, float],
    chunk_size: int = 1024,
    kd_rows: int | None = None,
    buffers: ChunkBuffers | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted sum of the row-loss parts over all rows, with gradients, computed chunk by chunk.

    hidden (N, H) student hidden states at the rows that carry a loss; head: the student's `ModelHead` (weight
    (V, H), possibly tied to the input embedding, bias and the model's logit transform, through which the
    gradients are chained), or a bare weight; row_inputs: tensors with first dim N passed chunked to row_loss
    (no grad). Returns (total fp32 scalar, {part: detached fp32 sum}); total = sum part_weights[k] * parts[k].
    Gradient work is skipped when nothing requires grad (evaluation). N == 0 gives zeros, never NaN.
    A row loss with a `with_grad(logits, part_weights, *row_inputs) -> (parts, grad_logits)` method (e.g.
    `sakd.losses.fused.FusedForwardKL`) supplies the chunk's logit gradient itself; autograd is not used.

    `kd_rows`: the caller put its distillation rows first, and these are the only rows that have a teacher;
    each chunk's row loss is then called with `kd_rows=` the chunk's own count (a host int), so that it slices
    those rows instead of selecting them by mask (a selection would wait for the device).

    `buffers`: where the chunks' logits (and a fused row loss's logit gradient and scratch tensors, as
    `grad_out=` and `scratch=`) are written instead of fresh tensors.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    rows = hidden.shape[0]
    if any(t.shape[0] != rows for t in row_inputs):
        raise ValueError(
            f"every row input needs first dim {rows}: got {[tuple(t.shape) for t in row_inputs]}"
        )
    head = as_head(head)
    needs = [t is not None and t.requires_grad for t in (hidden, head.weight, head.bias)]
    train = torch.is_grad_enabled() and any(needs)
    hidden_, frozen = hidden.detach(), head.detach()
    weight_ = frozen.weight
    grad_hidden = torch.zeros_like(hidden_) if needs[0] and train else None
    # Accumulated over chunks in fp32 so that low-precision weights do not lose small contributions.
    grad_weight = torch.zeros_like(weight_, dtype=torch.float32) if needs[1] and train else None
    grad_bias = torch.zeros_like(frozen.bias, dtype=torch.float32) if needs[2] and train else None

    parts: dict[str, torch.Tensor] = {}
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    # An empty batch still runs one (empty) chunk, so the part names are known and every part is 0.
    for start in range(0, max(rows, 1), chunk_size):
        stop = min(start + chunk_size, rows)
        hidden_chunk = hidden_[start:stop]
        n, vocab = stop - start, weight_.shape[0]
        with torch.no_grad():
            out = None if buffers is None else buffers.get("logits", n, vocab, weight_.dtype, weight_.device)
            logits = head_logits(hidden_chunk, frozen, out).requires_grad_(train)  # (n, V)
        chunk_inputs = [t[start:stop] for t in row_inputs]
        kwargs = {} if kd_rows is None else {"kd_rows": min(max(kd_rows - start, 0), stop - start)}
        if train and buffers is not None and hasattr(row_loss, "with_grad"):
            kwargs["grad_out"] = buffers.get("grad", n, vocab, torch.float32, weight_.device)
            kwargs["scratch"] = buffers
        chunk_parts, chunk_total, grad_logits = _chunk_loss(
            row_loss, logits, chunk_inputs, part_weights, kwargs, train
        )
        for name, value in chunk_parts.items():
            parts[name] = parts.get(name, 0.0) + value.detach().float()
        if chunk_total is None:
            continue
        total = total + chunk_total.detach().float()
        if grad_logits is None:
            continue
        # Through the model's logit transform to the linear output (nothing to do for most models).
        grad_logits = head.transform.chain_(grad_logits, logits).to(weight_.dtype)  # (n, V)
        _add_head_grads(grad_logits, hidden_chunk, weight_, (grad_hidden, grad_weight, grad_bias), start)
        # Free this chunk's (n, V) tensors before the next chunk allocates its own: the peak stays one chunk.
        del logits, grad_logits, chunk_parts, chunk_total

    return _finish(total, parts, hidden, head, (grad_hidden, grad_weight, grad_bias) if train else None)


def _add_head_grads(
    grad_logits: torch.Tensor,
    hidden_chunk: torch.Tensor,
    weight: torch.Tensor,
    grads: tuple[torch.Tensor | None, ...],
    start: int,
) -> None:
    """A chunk's share of the gradients (hidden rows from `start`, weight, bias; None: not needed), written
    and added in place where the dtypes allow: a fresh (V, H) product per chunk is fresh pages on the CPU,
    which cost as much as the product when the chunks are small."""
    grad_hidden, grad_weight, grad_bias = grads
    if grad_hidden is not None:
        rows = grad_hidden[start : start + grad_logits.shape[0]]
        if grad_hidden.dtype == weight.dtype:
            torch.mm(grad_logits, weight, out=rows)
        else:
            rows.copy_(grad_logits @ weight)
    if grad_weight is not None:
        if grad_logits.dtype == hidden_chunk.dtype == grad_weight.dtype:
            grad_weight.addmm_(grad_logits.T, hidden_chunk)
        else:
            grad_weight += grad_logits.T @ hidden_chunk
    if grad_bias is not None:
        grad_bias += grad_logits.sum(0)


def _finish(
    total: torch.Tensor,
    parts: dict[str, torch.Tensor | float],
    hidden: torch.Tensor,
    head: ModelHead,
    grads: tuple[torch.Tensor | None, ...] | None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The parts as fp32 tensors, and the total with the accumulated `grads` (hidden, weight, bias) attached
    in the dtypes of the tensors they belong to (None: not training)."""
    parts = {
        name: torch.as_tensor(value, dtype=torch.float32, device=hidden.device)
        for name, value in parts.items()
    }
    if grads is None:
        return total, parts
    grad_hidden, grad_weight, grad_bias = grads
    if grad_weight is not None:
        grad_weight = grad_weight.to(head.weight.dtype)
    if grad_bias is not None:
        grad_bias = grad_bias.to(head.bias.dtype)
    attached = _AttachGrads.apply(total, hidden, head.weight, head.bias, grad_hidden, grad_weight, grad_bias)
    return attached, parts


def full_head_loss(
    hidden: torch.Tensor,
    head: ModelHead | torch.Tensor,
    row_loss: RowLoss,
    row_inputs: Sequence[torch.Tensor],
    part_weights: dict[str, float],
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Plain reference for `chunked_head_loss`: one (N, V) logits tensor and ordinary autograd (through the
    head's logit transform too)."""
    parts = row_loss(head_logits(hidden, as_head(head)), *row_inputs)
    total = _weighted_total(parts, part_weights)
    if total is None:
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    return total.float(), {name: value.detach().float() for name, value in parts.items()}


@dataclass(frozen=True)
class Chunking:
    """How many rows a chunk of the chunked losses holds: `chunk_size`, fewer when `chunk_logits` (rows x
    vocabulary) would be exceeded at the widest vocabulary a chunk applies."""

    size: int = 1024
    logits: int | None = None

    def rows(self, *heads: Any) -> int:
        """Rows per chunk for the LM heads (anything with a `.weight`, None skipped) a chunk applies."""
        present = [h.weight.shape for h in heads if h is not None]
        return chunk_rows(self.size, self.logits, max(v for v, _ in present), max(h for _, h in present))
