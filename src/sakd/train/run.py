"""One training run's state, which every phase of the loop takes (`sakd.train.loop`), and checkpoints save."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from accelerate.state import AcceleratorState

from sakd.config import Config
from sakd.train.inputs import TrainingInputs
from sakd.train.nonfinite import NonFiniteGuard
from sakd.train.step import Training
from sakd.train.tracking import LoopState


def make_accelerator(precision: str, cpu: bool = False) -> Accelerator:
    """The Accelerator of a run in `precision` ("fp32", "bf16" or "fp16"). Accelerate keeps the first
    Accelerator's mixed precision in a process-wide state and refuses another, so a second run in the same
    process (a notebook, a sweep, the bench, the tests) with another precision would fail: that part of the
    state is dropped first. The process group (PartialState) is kept."""
    mixed = "no" if precision == "fp32" else precision
    if AcceleratorState._shared_state.get("_mixed_precision", mixed) != mixed:
        AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(cpu=cpu, mixed_precision=mixed)


class TrainingStopped(Exception):
    """Training ended before max_steps for a reason the user must see (exit status `code`)."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


class NoWriter:
    """Processes other than the main one log nothing."""

    def log(self, record: dict[str, Any]) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


@dataclass
class Run:
    """Everything a run holds between its phases: settings, models and optimizer (`training`), data, the
    loader's position and the loop's counters (`state`), the metrics writer and the non-finite guard."""

    cfg: Config
    out: Path
    training: Training
    inputs: TrainingInputs
    loader: Any  # a WindowLoader, or its cached-teacher wrapper
    tokenizers: tuple[Any, Any]  # (student, teacher or None)
    state: LoopState = field(default_factory=LoopState)
    writer: Any = field(default_factory=NoWriter)
    eval_batches: list = field(default_factory=list)
    guard: NonFiniteGuard = field(default_factory=NonFiniteGuard)
    resumed_from: Path | None = None
    on_policy: Any = None  # an `OnPolicy` sampler when the student writes some micro-batches itself

    @property
    def accelerator(self) -> Accelerator:
        return self.training.accelerator

    @property
    def main(self) -> bool:
        return self.training.accelerator.is_main_process

    @property
    def checkpoints(self) -> Path:
        return self.out / "checkpoints"
