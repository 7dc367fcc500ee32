"""MetricsWriter: the same metrics.jsonl lines as the training loop, scalars in TensorBoard, W&B on demand;
`train.report_to` picks the trackers, none required."""

from __future__ import annotations

import copy
import json
import math
import sys
from pathlib import Path

import pytest
from helpers import metrics_records
from pydantic import ValidationError
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from sakd.config import TrainConfig, validate
from sakd.errors import UserError
from sakd.report.trackers import MetricsWriter, open_trackers
from sakd.train import loop
from sakd.train.loop import train

RECORDS = [
    {"event": "resume", "step": 2, "from": "run/checkpoints/step-000002"},
    {"event": "train", "step": 3, "lr": 1e-3, "loss": 6.5, "loss_lm": 5.9, "loss_kd": 0.6, "grad_norm": None},
    {"event": "skip", "step": 4, "windows": [3, 7], "loss": math.nan, "grad_norm": math.inf},
    {"event": "train", "step": 4, "lr": 9e-4, "loss": 6.25, "loss_lm": 5.75, "grad_norm": 1.5, "phase": "kd"},
    {"event": "eval", "step": 4, "raw": {"bits_per_byte": 6.7, "tokens": 100}, "ema": {"bits_per_byte": 6.8}},
    {
        "event": "end",
        "step": 4,
        "stop_reason": "max_steps",
        "final": {"weights": "raw", "bits_per_byte": 6.7},
    },
]


def test_metrics_lines_match_the_loop_and_tensorboard_holds_the_scalars(tmp_path):
    with MetricsWriter(tmp_path / "run") as writer:
        for record in RECORDS:
            writer.log(record)
    written = (tmp_path / "run" / "metrics.jsonl").read_text()
    assert written == "".join(json.dumps(r) + "\n" for r in RECORDS)
    if hasattr(loop, "_append_jsonl"):  # the loop's own writer, while it still has one
        for r in RECORDS:
            loop._append_jsonl(tmp_path / "loop.jsonl", r)
        assert written == (tmp_path / "loop.jsonl").read_text()

    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    scalars = events.Tags()["scalars"]

    def values(tag):
        return [(e.step, e.value) for e in events.Scalars(tag)]

    assert values("train/loss") == [(3, 6.5), (4, 6.25)]
    assert values("train/lr") == [(3, pytest.approx(1e-3)), (4, pytest.approx(9e-4))]
    assert values("train/grad_norm") == [(4, 1.5)]
    assert values("eval/raw/bits_per_byte") == [(4, pytest.approx(6.7))]
    assert values("eval/ema/bits_per_byte") == [(4, pytest.approx(6.8))]
    assert values("end/final/bits_per_byte") == [(4, pytest.approx(6.7))]
    assert math.isnan(values("skip/loss")[0][1]) and math.isinf(values("skip/grad_norm")[0][1])
    assert not any("windows" in t or "phase" in t or "stop_reason" in t for t in scalars)


def test_tensorboard_off_and_wandb_missing(tmp_path, monkeypatch):
    with MetricsWriter(tmp_path / "run", tensorboard=False) as writer:
        writer.log(RECORDS[1])
    assert not (tmp_path / "run" / "tensorboard").exists()
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == json.dumps(RECORDS[1]) + "\n"
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb now raises ImportError
    with pytest.raises(UserError, match="pip install wandb"):
        MetricsWriter(tmp_path / "other", tensorboard=False, wandb={"project": "sakd"})


@pytest.mark.parametrize(
    ("train", "expected"),
    [
        ({}, ["tensorboard"]),
        ({"tensorboard": False}, []),
        ({"wandb_project": "p"}, ["tensorboard", "wandb"]),
        ({"report_to": []}, []),
        ({"report_to": ["wandb"]}, ["wandb"]),
        ({"report_to": ["wandb", "tensorboard", "wandb"]}, ["wandb", "tensorboard"]),
    ],
)
def test_report_to_or_the_older_settings_choose_the_trackers(train, expected):
    assert TrainConfig(**train).trackers == expected


def test_an_unknown_tracker_is_a_config_error():
    with pytest.raises(ValidationError):
        TrainConfig(report_to=["mlflow"])
    with pytest.raises(UserError, match="unknown tracker"):
        open_trackers("unused", ["mlflow"], None, {})


def test_no_tracker_writes_only_the_metrics_lines(tmp_path):
    with open_trackers(tmp_path / "run", [], None, {}) as writer:
        writer.log(RECORDS[1])
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["metrics.jsonl"]


def test_wandb_requested_but_missing_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(UserError, match="pip install wandb") as error:
        open_trackers(tmp_path / "run", ["wandb"], None, {})
    assert "\n" not in str(error.value)


def test_wandb_offline_run_gets_the_scalars_and_the_config(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    logged = []
    real_init = wandb.init

    def recording_init(**kwargs):
        run = real_init(**kwargs)
        real_log = run.log
        run.log = lambda data, *a, **k: (logged.append(data), real_log(data, *a, **k))[1]
        return run

    monkeypatch.setattr(wandb, "init", recording_init)
    with open_trackers(tmp_path / "run", ["wandb"], "sakd-test", {"train": {"lr": 1e-3}}) as writer:
        run = writer._wandb_run
        for record in RECORDS:
            writer.log(record)
        assert run.project == "sakd-test" and run.config["train"]["lr"] == 1e-3
    assert logged[0] == {
        "step": 3,
        "train/lr": 1e-3,
        "train/loss": 6.5,
        "train/loss_lm": 5.9,
        "train/loss_kd": 0.6,
    }
    assert not (tmp_path / "run" / "tensorboard").exists()
    assert any((tmp_path / "run" / "wandb").glob("offline-run-*"))


@pytest.mark.parametrize("report_to", [[], ["wandb"]])
def test_a_training_run_reports_to_the_listed_trackers_only(base_config, tmp_path, monkeypatch, report_to):
    if report_to:
        pytest.importorskip("wandb")
        monkeypatch.setenv("WANDB_MODE", "offline")
        monkeypatch.setenv("WANDB_DIR", str(tmp_path))
        monkeypatch.setenv("WANDB_SILENT", "true")
    raw = copy.deepcopy(base_config)
    raw["data"]["eval"] = []
    raw["train"].update(max_steps=1, warmup_steps=0, report_to=report_to, wandb_project="sakd-test")
    train(validate(raw))
    run = Path(raw["output_dir"])
    assert len(metrics_records(run, "train")) == 1
    assert not (run / "tensorboard").exists()
    assert (run / "wandb").exists() == bool(report_to)
