"""The non-finite guard: steps with a non-finite loss or gradient are skipped, recorded and, past a rate, stop
the run; nothing is ever zeroed or clamped to hide a NaN.

`train_step` decides on the device whether a step is skipped (`all_finite`, given to the optimizer as its
`found_inf`). The loop keeps each step's verdict as a device tensor (`NonFiniteGuard.add`) and reads them all
at once when it logs, evaluates or saves (`settle`); only then are the skipped steps counted, listed with
their windows, and the non-finite rate checked (`too_many`).
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


class NonFiniteGuard:
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

    @staticmethod
    def too_many(state, tc) -> bool:
        """Whether the last `tc.nonfinite_window` steps skipped more than `tc.nonfinite_max_rate` of them."""
        return (
            bool(state.skipped_steps)
            and sum(state.recent_skips) > tc.nonfinite_max_rate * tc.nonfinite_window
        )

    @staticmethod
    def stop_message(state, checkpoints) -> str:
        return (
            f"{sum(state.recent_skips)} of the last {len(state.recent_skips)} steps had a non-finite loss or "
            "gradient (skipped windows are listed in metrics.jsonl); likely causes: a learning rate too high, "
            "fp16 overflow (use bf16 or fp32), a teacher that outputs NaN/inf, or bad data. The newest "
            f"checkpoint is in {checkpoints}"
        )


def all_finite(loss: torch.Tensor, grad_norm: torch.Tensor, accelerator: Accelerator) -> torch.Tensor:
    """Whether every process's loss and the gradient norm are finite: a bool on the device (nothing waits for
    it). Gradients are already all-reduced (same norm everywhere); losses differ per process."""
    finite = torch.isfinite(loss) & torch.isfinite(torch.as_tensor(grad_norm, device=loss.device))
    if accelerator.num_processes == 1:
        return finite
    return accelerator.reduce((~finite).to(torch.int32), reduction="sum") == 0
