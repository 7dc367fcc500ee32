"""TAID's schedule for the interpolation parameter t (Shing et al. 2025, "TAID: temporally adaptive
interpolated distillation", ICLR 2025; the update follows the authors' public code).

The loss itself is `sakd.losses.divergence.taid_logprobs` (registered as the divergence "taid", whose `beta`
is t): the student learns from p_t = softmax((1 - t) * stopgrad(student) + t * teacher). t starts at t_start,
so the target begins close to the student, and rises to t_end. Each step t follows at least the linear ramp
from t_start to t_end, and moves faster while the loss falls quickly:

    relative_change = (previous_loss - loss) / (previous_loss + 1e-15)
    momentum = beta * momentum + (1 - beta) * relative_change
    t = min(t_end, max(t_start + (t_end - t_start) * step / total_steps,
                       t + alpha * sigmoid(momentum) * (1 - t)))

The first update only records the loss.
"""

import math
from typing import Any

import torch

from sakd.losses.divergence import taid_logprobs

__all__ = ["TAIDSchedule", "taid_logprobs"]


class TAIDSchedule:
    """The current t of TAID and its adaptive update; state_dict/load_state_dict resume it exactly.

    t_start in [0, 1), t_end in (0, 1] with t_start <= t_end; alpha in [0, 1] scales the adaptive step;
    beta in [0, 1) is the momentum of the relative loss change. adaptive=False follows the linear ramp only.
    """

    def __init__(
        self,
        t_start: float = 0.4,
        t_end: float = 1.0,
        alpha: float = 5e-4,
        beta: float = 0.99,
        adaptive: bool = True,
    ) -> None:
        problems = []
        if not 0.0 <= t_start < 1.0:
            problems.append(f"t_start must be in [0, 1), got {t_start}")
        if not 0.0 < t_end <= 1.0:
            problems.append(f"t_end must be in (0, 1], got {t_end}")
        if not t_start <= t_end:
            problems.append(f"t_start ({t_start}) must not exceed t_end ({t_end})")
        if not 0.0 <= alpha <= 1.0:
            problems.append(f"alpha must be in [0, 1], got {alpha}")
        if not 0.0 <= beta < 1.0:
            problems.append(f"beta must be in [0, 1), got {beta}")
        if problems:
            raise ValueError("TAID schedule: " + "; ".join(problems))
        self.t_start, self.t_end, self.alpha, self.beta, self.adaptive = t_start, t_end, alpha, beta, adaptive
        self.t = t_start
        self.previous_loss: float | None = None
        self.momentum = 0.0

    def update(self, loss: float | torch.Tensor, step: int, total_steps: int) -> float:
        """Take the loss of the step just done and return the t for the next one.

        `loss` is the step's distillation loss (a float or 0-d tensor; with several processes pass the same,
        all-reduced value everywhere so that t stays equal on all of them); `step` counts the optimizer steps
        done, this one included, out of `total_steps`. A non-finite loss (a skipped step) leaves the state
        as it is, so that one bad step cannot poison the momentum for the rest of training.
        """
        if total_steps <= 0:
            raise ValueError(f"total_steps must be positive, got {total_steps}")
        loss = float(loss)
        if not math.isfinite(loss):
            return self.t
        if self.previous_loss is None:
            self.previous_loss = loss
            return self.t
        relative_change = (self.previous_loss - loss) / (self.previous_loss + 1e-15)
        self.momentum = self.beta * self.momentum + (1.0 - self.beta) * relative_change
        ramp = self.t_start + (self.t_end - self.t_start) * min(step / total_steps, 1.0)
        if self.adaptive:
            adaptive_step = self.alpha * _sigmoid(self.momentum) * (1.0 - self.t)
            self.t = min(self.t_end, max(ramp, self.t + adaptive_step))
        else:
            self.t = ramp
        self.previous_loss = loss
        return self.t

    def state_dict(self) -> dict[str, Any]:
        return {"t": self.t, "previous_loss": self.previous_loss, "momentum": self.momentum}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.t = float(state["t"])
        previous = state["previous_loss"]
        self.previous_loss = None if previous is None else float(previous)
        self.momentum = float(state["momentum"])


def _sigmoid(x: float) -> float:
    # The two forms keep exp from overflowing for a large |x|.
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)
