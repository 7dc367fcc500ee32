"""MetricsWriter: the same metrics.jsonl lines as the training loop, scalars in TensorBoard, W&B on demand."""

from __future__ import annotations

import json
import math
import sys

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from sakd.errors import UserError
from sakd.report.trackers import MetricsWriter
from sakd.train import loop

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
