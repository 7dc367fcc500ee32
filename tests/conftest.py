"""Tiny models and tokenizers built offline: a Qwen3-MoE teacher and Llama students, on stdlib source text."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from sakd.models.tiny import dense_student_config, moe_teacher_config, train_tokenizer

STDLIB = Path(sysconfig.get_paths()["stdlib"])
TESTS = Path(__file__).parent
# Modules that start processes (torchrun, the CLI in a subprocess) or train several runs end to end: the
# `slow` marker, so that `pytest -m "not slow"` is a fast subset.
SLOW_MODULES = {
    "distributed/test_configs.py",
    "distributed/test_data_parallel.py",
    "distributed/test_fsdp.py",
    "distributed/test_lora_ddp.py",
    "e2e/test_cli_e2e.py",
    "report/test_report_resume.py",
    "train/test_before_training.py",
    "train/test_resume.py",
}


def pytest_collection_modifyitems(items) -> None:
    for item in items:
        if item.path.relative_to(TESTS).as_posix() in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)


TRAIN_FILES = ["argparse.py", "textwrap.py", "shlex.py", "string.py", "heapq.py", "bisect.py", "fnmatch.py"]
EVAL_FILES = ["colorsys.py", "keyword.py"]


def _write_jsonl(path: Path, names: list[str]) -> Path:
    with path.open("w") as f:
        for name in names:
            f.write(json.dumps({"text": (STDLIB / name).read_text()}) + "\n")
    return path


@pytest.fixture(scope="session")
def assets(tmp_path_factory) -> dict[str, Path]:
    """Corpus files and model folders: `teacher` (MoE, tokenizer A), `student` (dense, tokenizer B),
    `student_same` (dense, tokenizer A)."""
    root = tmp_path_factory.mktemp("assets")
    train = _write_jsonl(root / "train.jsonl", TRAIN_FILES)
    evalp = _write_jsonl(root / "eval.jsonl", EVAL_FILES)
    texts = [(STDLIB / n).read_text() for n in TRAIN_FILES]
    tok_a = train_tokenizer(texts, 512, split="gpt2")
    tok_b = train_tokenizer(texts, 384, split="isolated")
    specs = {
        "teacher": (
            moe_teacher_config(len(tok_a), hidden_size=48, layers=2, heads=4, experts=4, max_length=512),
            tok_a,
        ),
        "student": (
            dense_student_config(len(tok_b), hidden_size=32, layers=2, heads=2, max_length=512),
            tok_b,
        ),
        "student_same": (
            dense_student_config(len(tok_a), hidden_size=32, layers=2, heads=2, max_length=512),
            tok_a,
        ),
    }
    out = {"train": train, "eval": evalp, "root": root}
    for name, (cfg, tok) in specs.items():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg)
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        out[name] = root / name
    return out


@pytest.fixture
def base_config(assets, tmp_path) -> dict:
    """A small cross-tokenizer distillation config as a raw mapping (validate it after editing)."""
    return {
        "teacher": {"model": str(assets["teacher"])},
        "student": {"model": str(assets["student"]), "init": "pretrained"},
        "data": {
            "train": [str(assets["train"])],
            "eval": [str(assets["eval"])],
            "max_length": 64,
            "eval_max_windows": 8,
        },
        "train": {
            "max_steps": 6,
            "batch_size": 2,
            "grad_accum": 1,
            "lr": 1e-3,
            "warmup_steps": 2,
            "seed": 0,
            "log_every": 1,
            "progress": False,
            "ema_decay": 0.9,
        },
        "output_dir": str(tmp_path / "run"),
    }
