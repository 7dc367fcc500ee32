"""Skipped steps, recorded without waiting for the device at every step.

`train_step` decides on the device whether a step is skipped (a non-finite loss or gradient). The loop keeps
each step's verdict as a device tensor and reads them all at once when it logs, evaluates or saves; only then
are the skipped steps counted, listed with their windows, and the non-finite rate checked.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object


@dataclass
class _Pending:
    step: int
    stepped: torch.Tensor  # bool, on the device
    loss: torch.Tensor  # over all processes
    grad_norm: torch.Tensor
    windows: list[int]  # this process's


class SkipVerdicts:
    def __init__(self):
        self.pending: list[_Pending] = []

    def add(self, step: int, result, loss: torch.Tensor, windows: list[int]) -> None:
        self.pending.append(_Pending(step, result.stepped, loss, result.grad_norm, windows))

    def settle(self, state, writer, accelerator: Accelerator, window: int) -> None:
        """Count the pending steps into `state` (its `recent_skips` keeps the last `window` verdicts) and log
        each skipped one with the windows of every process (a collective: every process calls this at the
        same steps)."""
        if not self.pending:
            return
        verdicts = torch.stack([p.stepped for p in self.pending]).tolist()
        for p, stepped in zip(self.pending, verdicts, strict=True):
            state.recent_skips = (state.recent_skips + [0 if stepped else 1])[-window:]
            if stepped:
                continue
            ids = p.windows if accelerator.num_processes == 1 else gather_object(p.windows)
            state.skipped_steps += 1
            state.skipped_batches = (state.skipped_batches + [[p.step, *ids]])[-100:]
            writer.log(
                {
                    "event": "skip",
                    "step": p.step,
                    "windows": ids,
                    "loss": float(p.loss),
                    "grad_norm": float(p.grad_norm),
                }
            )
        self.pending = []
