"""What the training loop counts and logs: the counters saved in every checkpoint, the averages of a log
interval, and the early-stopping decision."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from sakd.curriculum import CurriculumPoint


@dataclass
class LoopState:
    """Counters saved in every checkpoint."""

    step: int = 0
    skipped_steps: int = 0
    tokens_seen: int = 0
    elapsed_s: float = 0.0
    best_bpb: float | None = None
    evals_without_improvement: int = 0
    recent_skips: list[int] = field(default_factory=list)
    skipped_batches: list[list[int]] = field(default_factory=list)


class LogInterval:
    """Loss parts, tokens and time since the last log line, averaged per optimizer step. Losses stay on the
    device until the log line (no wait for the device at every step)."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.steps = 0
        self.loss = 0.0
        self.parts: dict[str, float] = {}
        self.tokens = 0
        self.sampled = 0  # micro-batches of the student's own text (on-policy)
        self.grad_norm = math.nan  # of the last step that was not skipped
        self.t0 = time.perf_counter()

    def add(self, loss, parts, tokens: int, grad_norm, stepped) -> None:
        self.steps += 1
        self.loss = self.loss + loss.detach().double()
        for k, v in parts.items():
            self.parts[k] = self.parts.get(k, 0.0) + v.detach().double()
        self.tokens += tokens
        self.grad_norm = torch.where(stepped, grad_norm.detach().float(), self.grad_norm)

    def flush(self, state: LoopState, lr: float, point: CurriculumPoint) -> dict[str, Any]:
        dt = max(time.perf_counter() - self.t0, 1e-9)
        record = {
            "event": "train",
            "step": state.step,
            "lr": lr,
            "loss": float(self.loss) / max(self.steps, 1),
            **{f"loss_{k}": float(v) / max(self.steps, 1) for k, v in self.parts.items()},
            "grad_norm": None if math.isnan(grad_norm := float(self.grad_norm)) else grad_norm,
            "tokens_per_s": self.tokens / dt,
            "sampled_batches": self.sampled,
            "skipped_steps": state.skipped_steps,
            "elapsed_s": round(state.elapsed_s, 2),
            "phase": point.phase,
            "temperature": point.temperature,
            "top_k": point.top_k,
            **{f"weight_{k}": v for k, v in point.weights.items()},
        }
        self.reset()
        return record


def proc_status_bytes(field: str) -> int | None:
    """A size field of /proc/self/status ("VmHWM", "VmRSS", ...) in bytes; None where there is none (not
    Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def peak_memory(device: torch.device) -> dict[str, Any]:
    """This process's peak memory so far, as a run's summary reports it ("bytes", "gib", "method"): on a
    GPU the CUDA allocator's peak (what `sakd plan` estimates for a GPU), elsewhere the peak resident size
    (VmHWM, Linux only; None elsewhere)."""
    if device.type == "cuda":
        peak, method = torch.cuda.max_memory_allocated(device), "torch.cuda.max_memory_allocated"
    else:
        peak, method = proc_status_bytes("VmHWM"), "VmHWM"
    if peak is None:
        return {"bytes": None, "gib": None, "method": None}
    return {"bytes": peak, "gib": peak / 2**30, "method": method}


def early_stop_due(state: LoopState, result: dict[str, Any], tc) -> bool:
    """Whether training should stop early after this evaluation `result` (train config `tc`); updates the
    best held-out bits per byte and the evaluations without improvement."""
    bpb = result["best_bits_per_byte"]
    if state.best_bpb is None or bpb < state.best_bpb:
        state.best_bpb = bpb
        state.evals_without_improvement = 0
        return False
    state.evals_without_improvement += 1
    return (
        tc.early_stop_patience is not None
        and state.evals_without_improvement >= tc.early_stop_patience
        and state.step >= tc.early_stop_min_steps
    )
