"""Crash-safe checkpoint folders: written to a temporary folder, renamed atomically, with a manifest written last.

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
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sakd.errors import UserError

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
