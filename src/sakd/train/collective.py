"""Decisions and sums shared by every process of a run (no-ops on one process)."""

from __future__ import annotations

import torch
from accelerate import Accelerator

from sakd.train.objective import TokenCounts

# Batch-level loss parts are per-process means (averaged by DDP); the token-level ones are shares of sums over
# all processes.
BATCH_LEVEL_PARTS = ("balance", "contrastive")


def average_gradients(module: torch.nn.Module, accelerator: Accelerator) -> None:
    """The heads are not wrapped in DDP: average their gradients over processes by hand."""
    if accelerator.num_processes == 1:
        return
    for p in module.parameters():
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        p.grad.copy_(accelerator.reduce(p.grad, reduction="mean"))


def global_counts(counts: TokenCounts, tokens: int, accelerator: Accelerator) -> tuple[TokenCounts, int]:
    """The step's loss-normalising counts and student tokens, added up over all processes."""
    if accelerator.num_processes == 1:
        return counts, tokens
    t = torch.tensor([counts.lm, counts.kd, tokens], device=accelerator.device)
    lm, kd, tokens = accelerator.reduce(t, reduction="sum").tolist()
    return TokenCounts(lm, kd), tokens


def global_sums(values: dict[str, float], accelerator: Accelerator) -> dict[str, float]:
    """Named float sums added up over all processes (in float64)."""
    if accelerator.num_processes == 1:
        return values
    names = sorted(values)
    total = torch.tensor([values[k] for k in names], dtype=torch.float64, device=accelerator.device)
    total = accelerator.reduce(total, reduction="sum")
    return {k: float(total[i]) for i, k in enumerate(names)}


def global_losses(
    loss: torch.Tensor, parts: dict[str, torch.Tensor], accelerator: Accelerator
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The step's loss and parts over all processes, for the logs: each process's loss is scaled by the number
    of processes (DDP averages gradients), so the global loss is the mean; token-level parts are summed."""
    n = accelerator.num_processes
    if n == 1:
        return loss, parts
    names = sorted(parts)
    total = accelerator.reduce(torch.stack([loss.float(), *(parts[k].float() for k in names)]), "sum")
    global_parts = {k: total[i + 1] / (n if k in BATCH_LEVEL_PARTS else 1) for i, k in enumerate(names)}
    return total[0] / n, global_parts


def agree_max(value: int, accelerator: Accelerator) -> int:
    """All processes take the same decision (stop, skip): the largest of their values."""
    if accelerator.num_processes == 1:
        return value
    return int(accelerator.reduce(torch.tensor(value, device=accelerator.device), reduction="max"))


def all_finite(loss: torch.Tensor, grad_norm: torch.Tensor, accelerator: Accelerator) -> torch.Tensor:
    """Whether every process's loss and the gradient norm are finite: a bool on the device (nothing waits for
    it). Gradients are already all-reduced (same norm everywhere); losses differ per process."""
    finite = torch.isfinite(loss) & torch.isfinite(torch.as_tensor(grad_norm, device=loss.device))
    if accelerator.num_processes == 1:
        return finite
    return accelerator.reduce((~finite).to(torch.int32), reduction="sum") == 0
