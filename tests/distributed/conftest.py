"""Two CPU processes through torchrun (gloo): the real CLI in subprocesses on the tiny models, and the
in-process single-process runs they are compared with. The two-process runs are slow to start (each process
imports torch and transformers), so the runs that several tests read are made once per session."""

from __future__ import annotations

import copy
import subprocess
import sysconfig
from collections.abc import Callable
from pathlib import Path

import pytest
from dist_helpers import run_two
from helpers import write_yaml

from sakd.config import validate
from sakd.train.loop import train

STDLIB = Path(sysconfig.get_paths()["stdlib"])
# KD + LM only: the router's token weights are per-micro-batch statistics, not invariant to sharding.
PLAIN_KD = {"enabled": False, "weights": {"token_weighting": 0.0}}


@pytest.fixture(scope="session")
def dist_text(tmp_path_factory) -> Path:
    """About 60 windows of 32 tokens: longer than any run here (no epoch boundary)."""
    path = tmp_path_factory.mktemp("dist_data") / "train.txt"
    path.write_text((STDLIB / "bisect.py").read_text()[:3000])
    return path


@pytest.fixture(scope="session")
def dist_eval(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("dist_eval") / "eval.txt"
    path.write_text((STDLIB / "heapq.py").read_text()[:4000])
    return path


@pytest.fixture(scope="session")
def make_dist_raw(assets, dist_text, dist_eval, tmp_path_factory) -> Callable[..., dict]:
    """`make_dist_raw(name, **train)`: cross-tokenizer plain KD, 6 steps of a GLOBAL batch of 4 windows of
    32 tokens (2 per process on two processes), a checkpoint every 3 steps, EMA on, no held-out data."""
    root = tmp_path_factory.mktemp("dist_runs")

    def make(name: str, **train_overrides) -> dict:
        raw = {
            "teacher": {"model": str(assets["teacher"])},
            "student": {"model": str(assets["student"])},
            # 9 held-out windows: 5 batches of 2 split 3 + 2 over two processes
            "data": {
                "train": [str(dist_text)],
                "eval": [str(dist_eval)],
                "max_length": 32,
                "eval_max_windows": 9,
            },
            "curriculum": copy.deepcopy(PLAIN_KD),
            "train": {
                "max_steps": 6,
                "batch_size": 2,
                "lr": 1e-3,
                "warmup_steps": 1,
                "log_every": 1,
                "save_every": 3,
                "keep_last": 10,
                "ema_decay": 0.9,
                "progress": False,
                "tensorboard": False,
                **train_overrides,
            },
            "output_dir": str(root / name),
        }
        return raw

    return make


@pytest.fixture(scope="session")
def two_process_run(make_dist_raw) -> tuple[Path, subprocess.CompletedProcess]:
    """6 steps on two processes of batch 2, through torchrun and the real CLI."""
    raw = make_dist_raw("two")
    config = write_yaml(raw, Path(raw["output_dir"]).with_suffix(".yaml"))
    proc = run_two(config)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return Path(raw["output_dir"]), proc


@pytest.fixture(scope="session")
def one_process_run(make_dist_raw) -> Path:
    """The same 6 steps on one process of batch 4 (in this process)."""
    raw = make_dist_raw("one", batch_size=4)
    summary = train(validate(raw))
    assert summary["step"] == 6
    return Path(raw["output_dir"])
