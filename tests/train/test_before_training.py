"""`sakd train` measures the teacher and the student on held-out text before the first step, and warns when the
teacher is not better than the student."""

from __future__ import annotations

import copy
import json
import logging
import re
import shutil
from pathlib import Path

import pytest
import torch
from helpers import metrics_records, write_yaml
from transformers import AutoModelForCausalLM

from sakd.cache import capture_teacher_cache
from sakd.cli import main
from sakd.config import validate
from sakd.data.corpus import build_windows
from sakd.eval.metrics import lm_metrics
from sakd.models.load import load_tokenizer
from sakd.train.evaluate import BEFORE_TRAINING_WINDOWS, eval_batches

WARNING = "distillation from it will likely make the student worse"


def _trained_copy(folder: Path, train_file: Path, dest: Path, steps: int = 15) -> Path:
    """`folder`'s model after a few steps of next-token training on the training text: far better than random."""
    shutil.copytree(folder, dest)
    tok = load_tokenizer(str(folder), "student")
    model = AutoModelForCausalLM.from_pretrained(folder)
    text = "\n".join(json.loads(line)["text"] for line in train_file.read_text().splitlines())
    ids = torch.tensor(tok(text)["input_ids"])
    windows = ids[: (len(ids) // 64) * 64].view(-1, 64)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    torch.manual_seed(0)
    model.train()
    for _ in range(steps):
        batch = windows[torch.randint(len(windows), (4,))]
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(dest)
    return dest


@pytest.fixture(scope="module")
def trained(assets, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("trained")
    return {
        name: _trained_copy(assets[name], assets["train"], root / name) for name in ("teacher", "student")
    }


def _run(raw: dict, tmp_path: Path, caplog) -> tuple[dict, str, list[str]]:
    config = write_yaml(raw, tmp_path / "config.yaml")
    with caplog.at_level(logging.INFO, logger="sakd"):
        assert main(["train", str(config)]) == 0
    run = Path(raw["output_dir"])
    (before,) = metrics_records(run, "before_training")
    warnings = [
        r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and WARNING in r.getMessage()
    ]
    return before, (run / "report.md").read_text(), warnings


@pytest.fixture
def raw(base_config, assets, tmp_path) -> dict:
    raw = copy.deepcopy(base_config)
    short = tmp_path / "short.jsonl"  # little training text: one step and a teacher cache of it are quick
    first = json.loads(assets["train"].read_text().splitlines()[0])["text"]
    short.write_text(json.dumps({"text": first[:3000]}) + "\n")
    raw["data"]["train"] = [str(short)]
    raw["data"]["eval_max_windows"] = 40  # more than are measured before training
    raw["train"].update(max_steps=1, warmup_steps=0)
    return raw


@pytest.mark.parametrize("better", ["student", "teacher"])
def test_both_models_are_measured_and_a_worse_teacher_warns(raw, assets, trained, tmp_path, caplog, better):
    """A random teacher against a trained student warns; a trained teacher against a random student does not."""
    raw["teacher"]["model"] = str(trained["teacher"] if better == "teacher" else assets["teacher"])
    raw["student"]["model"] = str(trained["student"] if better == "student" else assets["student"])
    before, report, warnings = _run(raw, tmp_path, caplog)
    teacher, student = before["teacher"]["bits_per_byte"], before["student"]["bits_per_byte"]
    assert before["step"] == 0 and before["windows"] == BEFORE_TRAINING_WINDOWS
    assert (teacher < student) == (better == "teacher")
    assert len(warnings) == (better == "student")
    assert f"before training: teacher {teacher:.4f} bpb, student {student:.4f} bpb" in report
    assert (WARNING in report) == (better == "student")
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("before training")]
    assert len(lines) == 1 and f"{teacher:.4f}" in lines[0] and f"{student:.4f}" in lines[0]

    # The numbers are the plain evaluation of each model on its own tokens of the first 16 held-out windows.
    cfg = validate(raw)
    toks = [
        load_tokenizer(p, side)
        for p, side in ((cfg.student.tokenizer_path, "student"), (cfg.teacher.tokenizer_path, "teacher"))
    ]
    windows = build_windows(cfg.data.eval, *toks, cfg.data.max_length, cfg.data.eval_max_windows)
    batches = eval_batches(windows[:BEFORE_TRAINING_WINDOWS], 3, *toks)
    for side, value in (("student", student), ("teacher", teacher)):
        model = AutoModelForCausalLM.from_pretrained(getattr(cfg, side).model)
        assert lm_metrics(model, batches, side)["bits_per_byte"] == pytest.approx(value, rel=1e-5)


def test_with_a_teacher_cache_only_the_student_is_measured(raw, assets, tmp_path, caplog):
    capture_teacher_cache(validate(raw), top_k=8, path=tmp_path / "cache", progress=False)
    raw["teacher"]["cache"] = str(tmp_path / "cache")
    before, report, warnings = _run(raw, tmp_path, caplog)
    assert "teacher" not in before and not warnings
    assert re.search(r"before training: student \d+\.\d{4} bpb", report)
    assert f"student {before['student']['bits_per_byte']:.4f} bpb" in report
