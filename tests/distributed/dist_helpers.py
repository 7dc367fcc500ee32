"""Helpers for the two-process tests: torchrun commands, their environment, run folders."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path


def torchrun_command(*args: str, script: Path | None = None) -> list[str]:
    """`torchrun --standalone --nproc_per_node=2 -m sakd ARGS` (or a script instead of the module)."""
    torchrun = Path(sys.executable).parent / "torchrun"
    launcher = [str(torchrun)] if torchrun.exists() else [sys.executable, "-m", "torch.distributed.run"]
    target = [str(script)] if script else ["-m", "sakd"]
    return [*launcher, "--standalone", "--nproc_per_node=2", *target, *args]


def process_env(**extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "ACCELERATE_USE_CPU": "true",
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
        **extra,
    }


def run_two(
    config: Path, *args: str, script: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """`sakd train CONFIG ARGS` on two processes, to completion (output captured)."""
    return subprocess.run(
        torchrun_command("train", str(config), *args, script=script),
        env=process_env(**(env or {})),
        capture_output=True,
        text=True,
        timeout=600,
    )


def cut_after(source: Path, run: Path, step: int) -> None:
    """A copy of a finished run folder as a stop right after the checkpoint of `step` would leave it."""
    shutil.copytree(source, run)
    for ckpt in (run / "checkpoints").iterdir():
        if int(ckpt.name.split("-")[1]) > step:
            shutil.rmtree(ckpt)
    shutil.rmtree(run / "final")
    (run / "summary.json").unlink()
