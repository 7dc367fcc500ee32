"""Checkpoints: what one holds, how a run is saved and resumed, and the crash-safe folders they live in (written
to a temporary folder, renamed atomically, with a manifest written last).

Layout: `checkpoints/step-000120/` holding `student.safetensors` (a LoRA student's adapters only),
`training_state.pt` (optimizer, scheduler, scaler, EMA, loader position, counters), `rng-rank{r}.pt` and
`manifest.json` (step, files, sizes, sha256).
A folder without a manifest, or whose files do not match it, is damaged.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import random
import re
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from safetensors.torch import load_model as load_safetensors_model
from safetensors.torch import save_model as save_safetensors_model

from sakd.errors import UserError
from sakd.models.load import unwrap
from sakd.models.lora import load_student_weights, save_student_weights
from sakd.train.sharding import (
    gather_full_state,
    is_sharded,
    load_full_optimizer,
    load_full_weights,
    without_tied_copies,
)

if TYPE_CHECKING:
    from sakd.train.run import Run

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"^step-(\d{6,})$")


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def begin(root: Path, step: int) -> Path:
    """A fresh temporary folder for the checkpoint of `step` (removed first if a crash left one behind)."""
    tmp = root / f".tmp-{step_dir_name(step)}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def commit(root: Path, tmp: Path, step: int, keep_last: int, extra: dict[str, Any] | None = None) -> Path:
    """Write the manifest last, rename the folder into place, then prune to the newest `keep_last`."""
    files = {}
    for f in sorted(tmp.iterdir()):
        files[f.name] = {"bytes": f.stat().st_size, "sha256": _sha256(f)}
    manifest = {"step": step, "files": files, **(extra or {})}
    with (tmp / MANIFEST).open("w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    final = root / step_dir_name(step)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(root: Path) -> list[Path]:
    """Checkpoint folders under `root`, oldest first (complete or not)."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def verify(path: Path) -> str | None:
    """None when `path` is a complete checkpoint, else what is wrong with it."""
    manifest = path / MANIFEST
    if not manifest.is_file():
        return "no manifest (the write did not finish)"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError):
        return "unreadable manifest"
    for name, meta in files.items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != meta["bytes"]:
            return f"{name} has {f.stat().st_size} bytes, the manifest says {meta['bytes']}"
        if _sha256(f) != meta["sha256"]:
            return f"{name} does not match its checksum"
    return None


def resolve_resume(root: Path, resume: str) -> Path | None:
    """`auto`: the newest complete checkpoint (damaged ones skipped with a warning), None if there is none.
    A path: that checkpoint, refused with a `UserError` if it is damaged."""
    if resume != "auto":
        path = Path(resume)
        if not path.is_dir():
            raise UserError(
                f"--resume '{resume}' is not a checkpoint folder: pass a checkpoints/step-NNNNNN folder"
            )
        if problem := verify(path):
            raise UserError(
                f"checkpoint '{resume}' is damaged ({problem}): resume from another one or --resume auto"
            )
        return path
    for path in reversed(list_checkpoints(root)):
        if problem := verify(path):
            log.warning("skipping damaged checkpoint %s: %s", path, problem)
            continue
        return path
    return None


def load_state(path: Path) -> Any:
    """A `.pt` file of a checkpoint, unpickled with weights_only=True: tensors and plain containers only, so
    that a checkpoint from elsewhere cannot run code while it loads."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        detail = " ".join(str(e).split())[:200]
        raise UserError(
            f"checkpoint file '{path}' is not loadable safely: it holds objects other than tensors and plain "
            f"containers ({detail}); resume only from checkpoints written by sakd, or start a new run in "
            "another output_dir"
        ) from None


def rng_state() -> dict[str, Any]:
    """Every generator's state as tensors and plain values (loadable with weights_only=True)."""
    version, internal, gauss_next = random.getstate()
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "python": {
            "version": version,
            "internal": torch.tensor(internal, dtype=torch.int64),
            "gauss": gauss_next,
        },
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    python, numpy = state["python"], state["numpy"]
    random.setstate((python["version"], tuple(python["internal"].tolist()), python["gauss"]))
    keys = numpy["keys"].numpy().astype(np.uint32)
    np.random.set_state((numpy["kind"], keys, numpy["pos"], numpy["has_gauss"], numpy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run: Run, collective: bool = True) -> Path:
    """The run at its current step, in `run.checkpoints`. Every process writes its RNG state; the main process
    writes the rest. Never the teacher. Without `collective` (an emergency save after an exception) the main
    process writes it alone, with its own RNG state only; the other processes write nothing."""
    root, t, state = run.checkpoints, run.training, run.state
    accelerator, student, ema = t.accelerator, t.student, t.ema
    final = root / step_dir_name(state.step)
    sharded = is_sharded(unwrap(student))
    if sharded and not collective:
        raise RuntimeError(
            "a sharded (FSDP) student cannot be saved by one process alone: the newest periodic checkpoint "
            "is the one to resume from"
        )
    if not collective and not accelerator.is_main_process:
        return final
    sync = accelerator.wait_for_everyone if collective else lambda: None
    sync()
    tmp = root / f".tmp-{step_dir_name(state.step)}"
    if accelerator.is_main_process:
        tmp = begin(root, state.step)
    sync()
    torch.save(rng_state(), tmp / f"rng-rank{accelerator.process_index}.pt")
    # Collectives first (every process): the full weights of a sharded student, and the EMA's.
    if sharded:
        weights, optimizer_state = gather_full_state(unwrap(student), t.optimizer)
    ema_state = ema.state_dict() if ema is not None else None
    if accelerator.is_main_process:
        if sharded:
            save_file(without_tied_copies(weights, unwrap(student)), str(tmp / "student.safetensors"))
        else:
            save_student_weights(unwrap(student), tmp / "student.safetensors")
            optimizer_state = t.optimizer.state_dict()
        if t.heads is not None:
            save_safetensors_model(t.heads, str(tmp / "heads.safetensors"))
        torch.save(
            {
                "optimizer": optimizer_state,
                "scheduler": t.scheduler.state_dict(),
                "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
                "ema": ema_state,
                # the position counts global batches: their size makes it portable
                "loader": {
                    **run.loader.state_dict(),
                    "global_batch": run.loader.batch_size * run.loader.world_size,
                },
                "loop": asdict(state),
                "num_processes": accelerator.num_processes,
            },
            tmp / "training_state.pt",
        )
    sync()
    if accelerator.is_main_process:
        keep = max(run.cfg.train.keep_last, 1)
        final = commit(root, tmp, state.step, keep, {"num_processes": accelerator.num_processes})
    sync()
    return final


def load_checkpoint(run: Run, path: Path) -> None:
    """Restore the run's student, heads, optimizer, scheduler, scaler, EMA, loader position, counters and this
    process's RNG state from the checkpoint at `path`."""
    t, state, loader = run.training, run.state, run.loader
    accelerator, student, optimizer, ema = t.accelerator, t.student, t.optimizer, t.ema
    # A config changed under --force may no longer fit the checkpoint: the user's to fix, not a traceback.
    sharded = is_sharded(unwrap(student))
    try:
        if sharded:  # every process reads the full weights and keeps its shards
            load_full_weights(unwrap(student), load_file(str(path / "student.safetensors")))
        else:
            load_student_weights(unwrap(student), path / "student.safetensors")
    except (RuntimeError, KeyError) as e:
        detail = " ".join(str(e).split())[:300]
        raise UserError(
            f"checkpoint '{path}' does not fit this student ({detail}): resume with the student it was trained "
            "with, or start a new run in another output_dir"
        ) from None
    if t.heads is not None:
        load_safetensors_model(t.heads, str(path / "heads.safetensors"))
    saved = load_state(path / "training_state.pt")
    try:
        loader.load_state_dict(saved["loader"])
    except ValueError as e:
        raise UserError(
            f"cannot resume from '{path}': {e}: restore them, or start a new run in another output_dir"
        ) from None
    if sharded:
        load_full_optimizer(unwrap(student), optimizer, saved["optimizer"])
    else:
        optimizer.load_state_dict(saved["optimizer"])
    t.scheduler.load_state_dict(saved["scheduler"])
    if accelerator.scaler is not None and saved["scaler"] is not None:
        accelerator.scaler.load_state_dict(saved["scaler"])
    if ema is not None and saved["ema"] is not None:
        ema.load_state_dict(saved["ema"])
    for k, v in saved["loop"].items():
        setattr(state, k, v)
    rng = path / f"rng-rank{accelerator.process_index}.pt"
    if not rng.exists():  # saved by fewer processes: set_seed gave every process rank 0's generators
        rng = path / "rng-rank0.pt"
    if rng.exists():
        set_rng_state(load_state(rng))
