"""Decisions and sums shared by every process of a run (no-ops on one process).

Host values (token counts, stop decisions, evaluation sums) are reduced on a gloo group, as CPU tensors: on
NCCL a reduction is queued behind the step's kernels, so reading its result back would make the host wait for
the device at every step. Values that live on the device (losses, the finite check) stay on the run's group.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from accelerate import Accelerator

from sakd.train.rows import TokenCounts

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


_host_groups: dict[str, dist.ProcessGroup] = {}


def host_group() -> dist.ProcessGroup | None:
    """The group for host values: None (the default group) where that runs gloo already, else a gloo group
    of every process, made at the first call (every process makes its first host reduction at the same point,
    so they create it together)."""
    backend = str(dist.get_backend())
    if "gloo" in backend:  # "gloo", or a per-device backend such as "cpu:gloo,cuda:nccl"
        return None
    if backend not in _host_groups:
        _host_groups[backend] = dist.new_group(backend="gloo")
    return _host_groups[backend]


def release_host_groups() -> None:
    """Destroy the gloo groups made by `host_group`, on every process together (at the end of a run): a process
    that exits with one still connected can abort its peer."""
    if _host_groups:
        dist.barrier(group=next(iter(_host_groups.values())))
    while _host_groups:
        dist.destroy_process_group(_host_groups.popitem()[1])


def host_reduce(values: list, op: dist.ReduceOp, dtype: torch.dtype = torch.int64) -> list:
    """`values` reduced elementwise by `op` over all processes, on the host."""
    t = torch.tensor(values, dtype=dtype)
    dist.all_reduce(t, op=op, group=host_group())
    return t.tolist()


def global_counts(counts: TokenCounts, tokens: int, accelerator: Accelerator) -> tuple[TokenCounts, int]:
    """The step's loss-normalising counts and student tokens, added up over all processes."""
    if accelerator.num_processes == 1:
        return counts, tokens
    lm, kd, tokens = host_reduce([counts.lm, counts.kd, tokens], dist.ReduceOp.SUM)
    return TokenCounts(lm, kd), tokens


def global_sums(values: dict[str, float], accelerator: Accelerator) -> dict[str, float]:
    """Named float sums added up over all processes (in float64)."""
    if accelerator.num_processes == 1:
        return values
    names = sorted(values)
    total = host_reduce([values[k] for k in names], dist.ReduceOp.SUM, torch.float64)
    return dict(zip(names, total, strict=True))


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
    return int(host_reduce([value], dist.ReduceOp.MAX)[0])
