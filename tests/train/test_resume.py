"""Exact resume: a run killed at any point and resumed with
`--resume auto` ends with the same weights, optimizer, EMA and data position, bit for bit, as an uninterrupted
one; the teacher never re-reads skipped batches; a config that changes the run is refused."""

from __future__ import annotations

import random
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import metrics_records, write_yaml
from run_helpers import (
    assert_same_state,
    assert_tensors_equal,
    checkpoint_dir,
    load_weights,
    on_teacher_forward,
    student_weights,
    training_state,
)

from sakd.cli import main
from sakd.config import validate
from sakd.train import checkpoint
from sakd.train.loop import train


def _crashed_copy(ref: Path, run: Path, last_step: int) -> None:
    """The run folder as a crash right after the checkpoint of `last_step` would have left it."""
    shutil.copytree(ref, run)
    for ckpt in (run / "checkpoints").iterdir():
        if int(ckpt.name.split("-")[1]) > last_step:
            shutil.rmtree(ckpt)
    shutil.rmtree(run / "final")
    (run / "summary.json").unlink()


@pytest.mark.parametrize(
    ("data", "losses", "max_steps", "save_every", "resume_step"),
    [
        ("mid", "kd", 8, 1, 1),
        ("mid", "kd", 8, 1, 5),
        ("tiny", "kd", 8, 2, 2),
        ("tiny", "kd", 8, 2, 6),
        ("mid", "all", 3, 1, 2),
        ("mid", "on-policy", 6, 1, 3),
    ],
    ids=[
        "mid-epoch-step1",
        "mid-epoch-step5",
        "epochs-step2",
        "epochs-step6",
        "router-and-heads-step2",
        "on-policy-step3",
    ],
)
def test_resume_from_any_checkpoint_is_bit_exact(
    make_raw, reference_run, monkeypatch, data, losses, max_steps, save_every, resume_step
):
    """Resume from the checkpoint of step k (gradient accumulation 2): every later checkpoint equals the
    uninterrupted run's (with every loss on, the router and projection heads too); the teacher runs only for
    the batches after k (the loader jumps, no replay)."""
    raw = make_raw(data=data, losses=losses, max_steps=max_steps, save_every=save_every)
    ref = reference_run(raw)
    run = Path(raw["output_dir"])
    _crashed_copy(ref, run, resume_step)
    calls = on_teacher_forward(monkeypatch)

    summary = train(validate(raw), resume="auto")

    assert summary["step"] == max_steps
    assert calls["n"] == (max_steps - resume_step) * 2, "the teacher ran on batches before the resume point"
    assert metrics_records(run, "resume")[-1]["step"] == resume_step
    for step in range(resume_step + save_every, max_steps + 1, save_every):
        assert_same_state(checkpoint_dir(run, step), checkpoint_dir(ref, step))
    # the optimizer steps the live model after resume (not a stale copy of its parameters)
    after = student_weights(checkpoint_dir(run, resume_step + save_every))
    before = student_weights(checkpoint_dir(ref, resume_step))
    assert any(not torch.equal(after[k], before[k]) for k in after)
    final, ref_final = (
        load_weights(run / "final/model.safetensors"),
        load_weights(ref / "final/model.safetensors"),
    )
    assert_tensors_equal(final, ref_final, "final")
    if losses == "all":
        assert (checkpoint_dir(run, max_steps) / "heads.safetensors").is_file()
    epochs = (
        training_state(checkpoint_dir(run, resume_step))["loader"]["epoch"],
        training_state(checkpoint_dir(run, max_steps))["loader"]["epoch"],
    )
    if data == "mid":
        assert epochs == (0, 0), "the long-epoch case must resume and end mid-epoch"
    else:
        assert epochs[1] > epochs[0], "the short-epoch case must cross an epoch boundary after resuming"


@pytest.mark.parametrize(
    ("data", "save_every", "interruptions"),
    [
        ("mid", 1, ((signal.SIGKILL, 3),)),
        ("tiny", 2, ((signal.SIGKILL, 2), (signal.SIGTERM, 4))),
    ],
    ids=["long-epoch-save1-sigkill", "short-epochs-save2-sigkill-then-sigterm"],
)
def test_interrupted_cli_run_resumes_to_the_uninterrupted_result(
    make_raw, reference_run, cli_run, data, save_every, interruptions
):
    """The real CLI, interrupted as soon as the checkpoint of a step appears (SIGKILL: possibly while it writes
    the next one; SIGTERM: it saves a checkpoint, says how to resume and exits with 128 + 15), resumed with
    --resume auto until it finishes: the same final state, bit for bit, as an uninterrupted run."""
    raw = make_raw(data=data, save_every=save_every)
    run = Path(raw["output_dir"])
    run.mkdir()
    config = write_yaml(raw, run.parent / "config.yaml")
    for i, (signum, step) in enumerate(interruptions):
        proc = cli_run(config, *(["--resume", "auto"] if i else []))
        proc.wait_for(checkpoint_dir(run, step) / "manifest.json")
        proc.signal(signum)
        if signum == signal.SIGKILL:
            assert proc.wait() == -signal.SIGKILL
            continue
        assert proc.wait() == 128 + signum
        assert "Traceback" not in proc.stderr
        assert signal.Signals(signum).name in proc.stderr and "--resume auto" in proc.stderr
        newest = checkpoint.resolve_resume(run / "checkpoints", "auto")
        assert checkpoint.verify(newest) is None and step <= training_state(newest)["loop"]["step"] < 8
        assert not metrics_records(run, "end")
    proc = cli_run(config, "--resume", "auto")
    assert proc.wait() == 0, proc.stderr
    assert "done: 8 steps" in proc.stdout

    resumes = metrics_records(run, "resume")
    assert len(resumes) == len(interruptions)
    assert all(step <= r["step"] < 8 for r, (_, step) in zip(resumes, interruptions, strict=True))
    ref = reference_run(raw)
    assert_same_state(checkpoint_dir(run, 8), checkpoint_dir(ref, 8))
    final, ref_final = (
        load_weights(run / "final/model.safetensors"),
        load_weights(ref / "final/model.safetensors"),
    )
    assert_tensors_equal(final, ref_final, "final")
    resumed_epoch = training_state(Path(resumes[0]["from"]))["loader"]["epoch"]
    final_epoch = training_state(checkpoint_dir(run, 8))["loader"]["epoch"]
    if data == "mid":
        assert (resumed_epoch, final_epoch) == (0, 0)
    else:
        assert final_epoch > resumed_epoch


def test_rng_continues_after_resume(make_raw, monkeypatch):
    """Python, numpy and torch RNG continue after resume exactly where the interrupted run left them (a run
    restarted from the seed would repeat the first draws)."""
    draws: list[tuple] = []

    def draw(_n, _output):
        draws.append((random.random(), float(np.random.rand()), float(torch.rand(()))))

    on_teacher_forward(monkeypatch, draw)
    raw = make_raw("full", max_steps=4)
    train(validate(raw))
    full = list(draws)
    assert len(full) == 8 and len(set(full)) == 8

    draws.clear()
    resumed = make_raw("resumed", max_steps=4)
    _crashed_copy(Path(raw["output_dir"]), Path(resumed["output_dir"]), 2)
    train(validate(resumed), resume="auto")
    assert draws == full[4:]


def _run_cli(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().err


def _snapshot(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


@pytest.fixture
def finished_run(make_raw, reference_run) -> tuple[dict, Path]:
    """A copy of a finished 8-step run and its config."""
    raw = make_raw("finished")
    shutil.copytree(reference_run(make_raw()), raw["output_dir"])
    return raw, write_yaml(raw, Path(raw["output_dir"]).parent / "finished.yaml")


def test_resume_with_a_config_that_changes_the_run_is_refused(finished_run, assets, capsys):
    raw, config = finished_run
    run = Path(raw["output_dir"])
    before = _snapshot(run)
    raw["train"]["batch_size"] = 2
    raw["data"]["max_length"] = 48
    raw["student"]["model"] = str(assets["student"])
    write_yaml(raw, config)

    code, err = _run_cli(capsys, "train", str(config), "--resume", "auto")

    assert code == 2 and "Traceback" not in err
    (line,) = err.strip().splitlines()
    assert line.startswith("error: ")
    for key in ("train.batch_size", "data.max_length", "student.model", "--force"):
        assert key in line
    assert _snapshot(run) == before, "a refused resume wrote into the run"


def test_harmless_config_changes_resume(finished_run, capsys):
    raw, config = finished_run
    raw["train"].update(eval_every=5, log_every=3, save_every=4, keep_last=3)
    write_yaml(raw, config)
    code, err = _run_cli(capsys, "train", str(config), "--resume", "auto")
    assert code == 0, err
    assert metrics_records(Path(raw["output_dir"]), "resume")[-1]["step"] == 8
    saved = yaml.safe_load((Path(raw["output_dir"]) / "config.yaml").read_text())
    assert saved["train"]["log_every"] == 3


def test_force_resumes_despite_a_changed_batch_size(finished_run, capsys):
    raw, config = finished_run
    raw["train"]["batch_size"] = 2
    write_yaml(raw, config)
    code, err = _run_cli(capsys, "train", str(config), "--resume", "auto", "--force")
    assert code == 0, err
    assert yaml.safe_load((Path(raw["output_dir"]) / "config.yaml").read_text())["train"]["batch_size"] == 2


def test_force_with_data_that_no_longer_fits_the_checkpoint_is_a_user_error(finished_run, capsys):
    """--force cannot make a checkpoint fit changed data: one error line, no traceback."""
    raw, config = finished_run
    before = _snapshot(Path(raw["output_dir"]))
    raw["data"]["max_length"] = 48
    write_yaml(raw, config)
    code, err = _run_cli(capsys, "train", str(config), "--resume", "auto", "--force")
    assert code == 2 and "Traceback" not in err
    (line,) = [x for x in err.splitlines() if x.startswith("error:")]
    assert "max_length" in line
    assert _snapshot(Path(raw["output_dir"])) == before


def test_force_with_a_student_that_no_longer_fits_the_checkpoint_is_a_user_error(
    finished_run, assets, capsys
):
    raw, config = finished_run
    before = _snapshot(Path(raw["output_dir"]))
    raw["student"]["model"] = str(assets["student_same"])  # another vocabulary: other embedding shapes
    write_yaml(raw, config)
    code, err = _run_cli(capsys, "train", str(config), "--resume", "auto", "--force")
    assert code == 2 and "Traceback" not in err
    (line,) = [x for x in err.splitlines() if x.startswith("error:")]
    assert "does not fit this student" in line and "\n" not in line
    assert _snapshot(Path(raw["output_dir"])) == before
