"""Where the training loop's records go: metrics.jsonl (always), TensorBoard, and Weights & Biases.

metrics.jsonl is the source of truth (the report is built from it); one line per record, appended and
closed at once so that a killed run loses at most the line being written. TensorBoard and W&B get the
numeric values of each record as scalars named `<event>/<key>` (nested keys joined with `/`, e.g.
`eval/ema/bits_per_byte`) at the record's `step`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sakd.errors import UserError

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
TRACKERS = ("tensorboard", "wandb")


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The numeric values of a record as `<event>/<key>` scalars; lists, strings, None and bools are left out."""
    event = record.get("event", "record")
    out: dict[str, float] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}/{k}", v)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[prefix] = float(value)

    for key, value in record.items():
        if key not in ("event", "step"):
            walk(f"{event}/{key}", value)
    return out


class MetricsWriter:
    """`log(record)` appends the record to RUN_DIR/metrics.jsonl and sends its scalars to TensorBoard
    (RUN_DIR/tensorboard) and, when `wandb` is a dict of `wandb.init` arguments, to Weights & Biases.
    Only the main process should hold one."""

    def __init__(self, run_dir: str | Path, tensorboard: bool = True, wandb: dict[str, Any] | None = None):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / METRICS_FILE
        self._records = 0
        self._tensorboard = None
        self._wandb_run = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UserError(
                    "TensorBoard logging needs the tensorboard package: pip install tensorboard, "
                    "or turn TensorBoard logging off"
                ) from None
            self._tensorboard = SummaryWriter(log_dir=str(self.run_dir / TENSORBOARD_DIR), flush_secs=30)
        if wandb is not None:
            try:
                import wandb as wandb_module
            except ImportError:
                raise UserError(
                    "Weights & Biases logging is configured but wandb is not installed: pip install wandb "
                    "(or pip install 'sakd[wandb]'), or remove the wandb settings"
                ) from None
            self._wandb_run = wandb_module.init(**{"dir": str(self.run_dir), **wandb})
            # Steps repeat after a resume from an older checkpoint: plot against `step`, not W&B's own counter.
            self._wandb_run.define_metric("*", step_metric="step")

    def log(self, record: dict[str, Any]) -> None:
        append_jsonl(self.path, record)
        step = record.get("step")
        step = step if isinstance(step, int) and not isinstance(step, bool) else self._records
        self._records += 1
        values = scalars(record)
        if self._tensorboard is not None:
            for tag, value in values.items():
                self._tensorboard.add_scalar(tag, value, global_step=step)
        if self._wandb_run is not None and values:
            self._wandb_run.log({"step": step, **values})

    def flush(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.flush()

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_trackers(
    run_dir: str | Path, trackers: list[str], wandb_project: str | None, config: dict[str, Any]
) -> MetricsWriter:
    """The run's writer: metrics.jsonl always, plus each tracker named in `trackers` (none is required);
    W&B gets the resolved `config` and writes its files under the run folder."""
    unknown = sorted(set(trackers) - set(TRACKERS))
    if unknown:
        raise UserError(f"unknown tracker(s) {unknown} in train.report_to: choose from {list(TRACKERS)}")
    wandb = {"project": wandb_project or "sakd", "config": config} if "wandb" in trackers else None
    return MetricsWriter(run_dir, tensorboard="tensorboard" in trackers, wandb=wandb)
