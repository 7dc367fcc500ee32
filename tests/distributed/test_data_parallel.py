"""Data parallelism on two CPU processes (torchrun, gloo): disjoint shards, one writer, the same weights as one
process with the same global batch, resume across process counts, and decisions every process shares
(skipped steps, SIGTERM, the time budget, emergency saves)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from dist_helpers import cut_after, process_env, run_two, torchrun_command
from helpers import write_yaml
from safetensors.torch import load_file

from sakd.cli import main
from sakd.config import validate
from sakd.data.loader import Shard, WindowLoader
from sakd.data.packing import Window
from sakd.train import checkpoint
from sakd.train.loop import train

ATOL = 1e-5
FAULTY_SAKD = Path(__file__).with_name("faulty_sakd.py")


def _records(run: Path, event: str) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("event") == event]


def _ckpt(run: Path, step: int) -> Path:
    return run / "checkpoints" / checkpoint.step_dir_name(step)


def _state(ckpt: Path) -> dict:
    return torch.load(ckpt / "training_state.pt", map_location="cpu", weights_only=True)


def _max_diff(a: Path, b: Path) -> float:
    """The largest absolute difference between two checkpoints' student weights and EMA weights."""
    wa, wb = load_file(str(a / "student.safetensors")), load_file(str(b / "student.safetensors"))
    assert wa.keys() == wb.keys()
    diffs = [float((wa[k] - wb[k]).abs().max()) for k in wa]
    ea, eb = _state(a)["ema"]["shadow"], _state(b)["ema"]["shadow"]
    assert ea.keys() == eb.keys()
    diffs += [float((ea[k] - eb[k]).abs().max()) for k in ea]
    return max(diffs)


def _windows(count: int) -> list[Window]:
    ones = np.ones(4, dtype=np.int64)
    return [
        Window(np.arange(4) + 10 * i, ones, np.arange(4), np.arange(4) + 1000, ones, np.arange(4), index=i)
        for i in range(count)
    ]


def test_loader_position_carries_over_between_process_counts():
    """A position counted in global batches of 4 continues with the same windows on 1 x 4 and 2 x 2; with
    another global batch it is converted through the windows consumed (rounded up: none is read twice)."""
    windows = _windows(40)
    single = WindowLoader(windows, 4, seed=3, teacher=0)
    for _ in range(3):
        single.next_batch()
    state = {**single.state_dict(), "global_batch": 4}
    expected = single.next_batch().window_index.tolist()
    ranks = [WindowLoader(windows, 2, seed=3, shard=Shard(r, 2), teacher=0) for r in (0, 1)]
    for loader in ranks:
        loader.load_state_dict(state)
    assert [i for loader in ranks for i in loader.next_batch().window_index.tolist()] == expected
    larger = WindowLoader(windows, 8, seed=3, teacher=0)
    larger.load_state_dict(state)  # 12 windows consumed: global batch 2 of 8 starts at window 16
    assert larger.state_dict()["batch_in_epoch"] == 2


def test_two_processes_shard_the_data_and_one_process_writes(two_process_run):
    run, proc = two_process_run
    environment = json.loads((run / "environment.json").read_text())
    assert environment["num_processes"] == 2
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000003", "step-000006"]
    for step in (3, 6):
        ckpt = _ckpt(run, step)
        assert checkpoint.verify(ckpt) is None
        assert {"rng-rank0.pt", "rng-rank1.pt", "student.safetensors"} <= {p.name for p in ckpt.iterdir()}
        assert json.loads((ckpt / "manifest.json").read_text())["num_processes"] == 2
        loader = _state(ckpt)["loader"]
        assert (loader["epoch"], loader["batch_in_epoch"], loader["global_batch"]) == (0, step, 4)
    assert [r["step"] for r in _records(run, "train")] == [1, 2, 3, 4, 5, 6], "one metrics line per step"
    assert len(_records(run, "end")) == 1
    assert not list(run.glob("checkpoints/.tmp-*"))
    assert (run / "final" / "model.safetensors").is_file() and (run / "report.md").is_file()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["step"] == 6 and summary["skipped_steps"] == 0
    assert summary["tokens_seen"] == _records(run, "end")[0]["tokens_seen"]
    assert "Traceback" not in proc.stderr


def test_two_processes_of_batch_2_equal_one_process_of_batch_4(two_process_run, one_process_run):
    """Same global batch, same windows, losses normalised by the global token count: same weights (and EMA)
    up to float summation order, same logged losses and token counts."""
    two, _ = two_process_run
    for step in (3, 6):
        diff = _max_diff(_ckpt(two, step), _ckpt(one_process_run, step))
        print(f"step {step}: max abs difference of student and EMA weights, 2 x 2 vs 1 x 4: {diff:.2e}")
        assert diff < ATOL
    mine, theirs = _records(two, "train"), _records(one_process_run, "train")
    for key in ("loss", "loss_kd", "loss_lm", "grad_norm", "lr"):
        assert [r[key] for r in mine] == pytest.approx([r[key] for r in theirs], rel=1e-5), key
    assert (
        _state(_ckpt(two, 6))["loop"]["tokens_seen"]
        == _state(_ckpt(one_process_run, 6))["loop"]["tokens_seen"]
    )


def test_checkpoint_of_two_processes_resumes_on_one(two_process_run, one_process_run, make_dist_raw):
    """batch_size 2 x 2 processes -> 4 x 1: the global batch is kept, so the resume is accepted, the loader
    continues at the same window, and the result equals the uninterrupted single-process run."""
    two, _ = two_process_run
    raw = make_dist_raw("two-then-one", batch_size=4)
    run = Path(raw["output_dir"])
    cut_after(two, run, 3)
    summary = train(validate(raw), resume="auto")
    assert summary["step"] == 6
    assert _records(run, "resume")[-1]["step"] == 3
    diff = _max_diff(_ckpt(run, 6), _ckpt(one_process_run, 6))
    print(f"2 -> 1 processes, resumed at step 3: max abs difference at step 6: {diff:.2e}")
    assert diff < ATOL


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_checkpoint_of_one_process_resumes_on_two(one_process_run, make_dist_raw, strategy):
    """4 x 1 -> 2 x 2 (rank 1 has no RNG file of its own and takes rank 0's), with the student replicated or
    sharded; the checkpoints written under FSDP keep the plain, position-keyed optimizer state."""
    raw = make_dist_raw(f"one-then-two-{strategy}", strategy=strategy)
    run = Path(raw["output_dir"])
    cut_after(one_process_run, run, 3)
    proc = run_two(write_yaml(raw, run.with_suffix(".yaml")), "--resume", "auto")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert _records(run, "resume")[-1]["step"] == 3
    diff = _max_diff(_ckpt(run, 6), _ckpt(one_process_run, 6))
    print(f"1 -> 2 processes ({strategy}), resumed at step 3: max abs difference at step 6: {diff:.2e}")
    assert diff < ATOL
    optimizer = _state(_ckpt(run, 6))["optimizer"]
    assert all(isinstance(k, int) for k in optimizer["state"])


def test_a_changed_global_batch_is_refused_across_process_counts(two_process_run, make_dist_raw, capsys):
    two, _ = two_process_run
    raw = make_dist_raw("two-then-one-smaller")  # batch 2 on one process: a global batch of 2, not 4
    run = Path(raw["output_dir"])
    cut_after(two, run, 3)
    config = write_yaml(raw, run.with_suffix(".yaml"))
    assert main(["train", str(config), "--resume", "auto"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error:") and "global batch" in line and "2 x 2" in line and "2 x 1" in line


def test_sigterm_to_the_torchrun_group_stops_every_process_with_one_checkpoint(make_dist_raw):
    """torchrun forwards SIGTERM to its workers; they agree at the next step boundary, write one checkpoint
    together and exit. The default objective with the router's token weights (heads outside DDP) trains."""
    raw = make_dist_raw("sigterm", max_steps=400, save_every=2)
    raw["curriculum"] = {"weights": {"token_weighting": 1.0}}
    run = Path(raw["output_dir"])
    config = write_yaml(raw, run.with_suffix(".yaml"))
    with open(run.with_suffix(".err"), "w") as err:
        proc = subprocess.Popen(
            torchrun_command("train", str(config)),
            env=process_env(),
            stdout=subprocess.DEVNULL,
            stderr=err,
            start_new_session=True,
        )
        try:
            deadline = time.monotonic() + 300
            while not (_ckpt(run, 2) / "manifest.json").exists():
                assert proc.poll() is None, run.with_suffix(".err").read_text()[-4000:]
                assert time.monotonic() < deadline
                time.sleep(0.05)
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(120)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    stderr = run.with_suffix(".err").read_text()
    assert proc.returncode != 0
    assert "stopped by SIGTERM" in stderr and "[rank1]: Traceback" not in stderr
    newest = checkpoint.resolve_resume(run / "checkpoints", "auto")
    step = _state(newest)["loop"]["step"]
    assert 2 <= step < 400 and checkpoint.verify(newest) is None
    assert {"rng-rank0.pt", "rng-rank1.pt", "heads.safetensors"} <= {p.name for p in newest.iterdir()}
    steps = [r["step"] for r in _records(run, "train")]
    assert steps == list(range(1, step + 1)) and not _records(run, "end")
    losses = [r["loss"] for r in _records(run, "train")]
    assert all(torch.isfinite(torch.tensor(losses))) and "loss_capacity" in _records(run, "train")[-1]


def test_time_budget_stops_both_processes_at_the_same_step(make_dist_raw):
    raw = make_dist_raw("budget", max_minutes=0.0001)
    run = Path(raw["output_dir"])
    proc = run_two(write_yaml(raw, run.with_suffix(".yaml")))
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((run / "summary.json").read_text())
    assert "time budget" in summary["stop_reason"] and summary["step"] == 1
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000001"]


def test_faults_on_one_process(make_dist_raw):
    """A NaN on process 1 only: both skip the step, and the skip record lists the windows of both. Then an
    exception on process 1 only: process 0 fails in the next collective and writes the emergency checkpoint
    of the last finished step alone; it resumes on one process."""
    raw = make_dist_raw("faults", nonfinite_max_rate=1.0, save_every=0)
    run = Path(raw["output_dir"])
    proc = run_two(write_yaml(raw, run.with_suffix(".yaml")), script=FAULTY_SAKD, env={"SAKD_FAULT": "1 2 4"})
    assert proc.returncode != 0
    assert "injected failure on rank 1" in proc.stderr and "checkpoint (emergency) saved" in proc.stderr
    (skip,) = _records(run, "skip")
    assert skip["step"] == 2 and len(skip["windows"]) == 4 and len(set(skip["windows"])) == 4
    assert [r["step"] for r in _records(run, "train")] == [1, 2, 3]
    (emergency,) = (run / "checkpoints").iterdir()
    assert emergency.name == "step-000003" and checkpoint.verify(emergency) is None
    saved = _state(emergency)
    assert saved["loop"]["skipped_steps"] == 1 and saved["loader"]["batch_in_epoch"] == 3
    weights = load_file(str(emergency / "student.safetensors"))
    assert all(torch.isfinite(v).all() for v in weights.values())

    raw["train"]["batch_size"] = 4
    write_yaml(raw, run.with_suffix(".yaml"))
    summary = train(validate(raw), resume="auto")
    assert summary["step"] == 6 and summary["skipped_steps"] == 1
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["batch_size"] == 4


def _final_eval(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())["eval"]


def test_evaluation_is_split_over_processes_and_adds_up(two_process_run, one_process_run):
    """Each process evaluates every other held-out batch (5 batches: 3 + 2); the summed metrics equal one
    process evaluating them all: every window counted once, same bits per byte and distillation loss."""
    two, one = _final_eval(two_process_run[0]), _final_eval(one_process_run)
    for weights in ("raw", "ema"):
        assert (two[weights]["tokens"], two[weights]["bytes"]) == (
            one[weights]["tokens"],
            one[weights]["bytes"],
        )
        assert two[weights]["bits_per_byte"] == pytest.approx(one[weights]["bits_per_byte"], rel=1e-5)
    assert two["distill_loss"] == pytest.approx(one["distill_loss"], rel=1e-5)
    assert two["kd"] == pytest.approx(one["kd"], rel=1e-5)


def test_host_values_are_reduced_on_a_gloo_group():
    """Token counts, stop decisions and evaluation sums never go through an NCCL group, where reading them
    back would wait for the step's kernels: a gloo group of their own is made for them."""
    script = Path(__file__).with_name("host_collectives.py")
    done = subprocess.run(
        torchrun_command(script=script), env=process_env(), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("host collectives ok") == 2
