"""Shared fixtures for the fault-tolerance tests: small corpora (one long epoch, one of a few batches), a
student with attention dropout (so its weights depend on the torch RNG), run configs, cached reference runs,
and the real CLI in a subprocess (killed at the end of the test if still running)."""

from __future__ import annotations

import copy
import json
import shutil
import sysconfig
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import CLIRun

from sakd.config import validate
from sakd.models import load as load_module
from sakd.train import step as step_module
from sakd.train.loop import train

STDLIB = Path(sysconfig.get_paths()["stdlib"])
AUXILIARY = {
    "feature": 0.5,
    "attention": 0.5,
    "router": 0.5,
    "balance": 0.01,
    "layerwise": 0.5,
    "contrastive": 0.1,
    "token_weighting": 1.0,
}
KD_ONLY = {"weights": dict.fromkeys(AUXILIARY, 0.0)}
EVERY_LOSS = {"enabled": False, "weights": AUXILIARY}


@pytest.fixture(scope="session")
def small_data(tmp_path_factory) -> dict[str, Path]:
    """`mid`: 41 windows of 32 tokens (an epoch longer than any test run); `tiny`: 5 windows
    (an epoch of a few batches, so runs cross epoch boundaries, also inside an accumulation cycle)."""
    root = tmp_path_factory.mktemp("small_data")
    text = (STDLIB / "bisect.py").read_text()
    (root / "mid.txt").write_text(text[:2000])
    (root / "tiny.txt").write_text(text[:200])
    return {"mid": root / "mid.txt", "tiny": root / "tiny.txt"}


@pytest.fixture(scope="session")
def dropout_student(assets, tmp_path_factory) -> Path:
    """The cross-tokenizer student with attention dropout: a resume that does not restore the torch RNG
    gives other dropout masks, hence other weights."""
    folder = tmp_path_factory.mktemp("dropout") / "student"
    shutil.copytree(assets["student"], folder)
    config = json.loads((folder / "config.json").read_text())
    config["attention_dropout"] = 0.1
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture
def make_raw(base_config, small_data, dropout_student, tmp_path) -> Callable[..., dict]:
    """`make_raw(name, data="mid", losses="kd", **train)`: a raw cross-tokenizer config writing to
    tmp_path/name, 8 steps of 2 micro-batches of 1 window of 32 tokens, checkpoint every step, no held-out
    data. losses "kd": KD + LM only (fast); "all": every loss and the router from the first step; "on-policy":
    KD + LM, half the micro-batches sampled by the student."""

    def make(name: str = "run", data: str = "mid", losses: str = "kd", **train_overrides) -> dict:
        raw = copy.deepcopy(base_config)
        raw["student"] = {"model": str(dropout_student)}
        raw["data"] = {"train": [str(small_data[data])], "eval": [], "max_length": 32, "eval_max_windows": 2}
        raw["curriculum"] = copy.deepcopy(EVERY_LOSS if losses == "all" else KD_ONLY)
        if losses == "on-policy":  # half the micro-batches are the student's own text
            raw["distill"] = {
                "on_policy_fraction": 0.5,
                "on_policy_prompt_tokens": 8,
                "on_policy_new_tokens": 16,
            }
        raw["train"].update(
            max_steps=8, batch_size=1, grad_accum=2, save_every=1, keep_last=20, ema_decay=0.9
        )
        raw["train"].update(train_overrides)
        raw["output_dir"] = str(tmp_path / name)
        return raw

    return make


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory) -> Callable[[dict], Path]:
    """`reference_run(raw)`: the folder of an uninterrupted in-process run of `raw` (its own output_dir),
    run once per distinct config in the session. Call it before patching anything the loop uses."""
    cache: dict[str, Path] = {}

    def run(raw: dict) -> Path:
        key = json.dumps({k: v for k, v in raw.items() if k != "output_dir"}, sort_keys=True)
        if key not in cache:
            assert step_module.load_model is load_module.load_model, "a reference run under a test's patches"
            ref = copy.deepcopy(raw)
            ref["output_dir"] = str(tmp_path_factory.mktemp("reference") / "run")
            summary = train(validate(ref))
            assert summary["step"] == ref["train"]["max_steps"]
            cache[key] = Path(ref["output_dir"])
        return cache[key]

    return run


@pytest.fixture
def cli_run() -> Callable[..., CLIRun]:
    runs: list[CLIRun] = []

    def start(config: Path, *args: str) -> CLIRun:
        run = CLIRun("train", str(config), *args, logs=config.parent / f"segment{len(runs)}")
        runs.append(run)
        return run

    yield start
    for run in runs:  # never leave a training process behind a failed test
        if run.proc.poll() is None:
            run.proc.kill()
            run.proc.wait()


@pytest.fixture(scope="module")
def cross_setup(assets):
    """(frozen teacher, teacher tokenizer, student tokenizer, one two-tokenizer batch of 3 windows of 48 tokens
    with its loss rows) from the session's tiny pair."""
    from sakd.data.corpus import build_windows
    from sakd.data.loader import WindowLoader
    from sakd.data.tokenize import input_format
    from sakd.models.load import freeze, load_model, load_tokenizer
    from sakd.train.rows import with_loss_rows

    teacher_tok = load_tokenizer(str(assets["teacher"]), "t")
    student_tok = load_tokenizer(str(assets["student"]), "s")
    windows = build_windows([str(assets["train"])], student_tok, teacher_tok, 48)
    formats = {"student": input_format(student_tok), "teacher": input_format(teacher_tok)}
    batch = with_loss_rows(WindowLoader(windows, 3, seed=0, **formats).next_batch())
    teacher = freeze(load_model(str(assets["teacher"]), "teacher"))
    return teacher, teacher_tok, student_tok, batch
