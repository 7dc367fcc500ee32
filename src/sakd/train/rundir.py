"""The run folder: resolved config, environment snapshot, and the rules for reusing a folder on resume."""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path
from typing import Any

import yaml

from sakd.config import Config, dump_config
from sakd.errors import UserError

CONFIG_FILE = "config.yaml"

# Changing these between segments of one run is harmless; anything else changes what is trained.
HARMLESS_KEYS = {
    "train.log_every",
    "train.eval_every",
    "train.save_every",
    "train.keep_last",
    "train.max_minutes",
    "train.progress",
    "train.strategy",
    "train.compile",
    "teacher.placement",
    "distill.fused_loss",
    "distill.chunk_logits",
    "train.tensorboard",
    "train.report_to",
    "train.wandb_project",
    "train.early_stop_patience",
    "train.early_stop_min_steps",
    "train.nonfinite_max_rate",
    "train.nonfinite_window",
    "data.eval",
    "data.eval_max_windows",
    "output_dir",
}


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def changed_keys(
    old: dict[str, Any], new: dict[str, Any], old_processes: int = 1, new_processes: int = 1
) -> list[str]:
    """Keys whose change alters the run. What defines it is the global batch, batch_size x processes (the
    loader's position counts global batches): the per-process batch_size may change with the number of
    processes as long as their product stays."""
    a, b = _flatten(old), _flatten(new)
    key = "train.batch_size"
    old_batch, new_batch = a.pop(key, None), b.pop(key, None)
    diff = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k) and k not in HARMLESS_KEYS)
    if old_batch is None or new_batch is None or old_batch * old_processes != new_batch * new_processes:
        if old_processes == new_processes:
            diff.append(key)
        else:
            diff.append(
                f"{key} x processes (the global batch: was {old_batch} x {old_processes}, "
                f"now {new_batch} x {new_processes})"
            )
        diff.sort()
    return diff


def saved_processes(out: Path) -> int:
    """The number of processes of the run segment that last wrote the folder (1 when unknown)."""
    try:
        return int(json.loads((out / "environment.json").read_text()).get("num_processes", 1))
    except (OSError, ValueError, TypeError, AttributeError):
        return 1


def prepare(cfg: Config, resume: str | None, force: bool, num_processes: int = 1) -> Path:
    """Check the folder may be used (never write over an existing run unless resuming), then write the
    resolved config. On resume, a config that changes the run is refused unless `force`."""
    out = Path(cfg.output_dir)
    saved = out / CONFIG_FILE
    if saved.exists() and resume is None:
        raise UserError(
            f"output_dir '{out}' already holds a run: pass --resume auto to continue it, or choose another output_dir"
        )
    if saved.exists() and not force:
        old = yaml.safe_load(saved.read_text())
        if diff := changed_keys(old, cfg.model_dump(mode="json"), saved_processes(out), num_processes):
            raise UserError(
                f"the config differs from the run being resumed in {', '.join(diff)}: "
                "restore those values, or pass --force to resume anyway"
            )
    return out


def write_run_files(out: Path, cfg: Config, environment: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_FILE).write_text(dump_config(cfg))
    (out / "environment.json").write_text(json.dumps(environment, indent=1))


def environment_snapshot(device: str, precision: str, num_processes: int) -> dict[str, Any]:
    import accelerate
    import torch
    import transformers

    import sakd

    return {
        "sakd": sakd.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
        "device": device,
        "precision": precision,
        "num_processes": num_processes,
        "command": sys.argv,
    }
