"""Every supported model family, as teacher and as student, with a tokenizer of its kind: the special tokens it
gets, the start-up head check, aligned windows, one real training step, `sakd eval` and `generate`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import metrics_records
from tokenizer_kinds import KINDS, NON_ASCII, tokenizer_of
from transformers import AutoModelForCausalLM, AutoTokenizer

from sakd.config import validate
from sakd.data.corpus import build_windows
from sakd.data.packing import collate_windows
from sakd.data.tokenize import input_format
from sakd.eval.run import EvalData, evaluate_model
from sakd.generate import generate_ids
from sakd.models.head import check_head
from sakd.models.tiny import FAMILIES, tiny_family_model
from sakd.train.loop import train

# Each family with a tokenizer of the kind its real models use, except that Unigram and WordPiece, which none
# of these families uses, go to Mistral and Granite, so that every tokenizer kind is covered.
FAMILY_TOKENIZER = {
    "llama": "metaspace_bpe_bos",
    "mistral": "unigram",
    "gemma2": "metaspace_bpe_bos",
    "gemma3_text": "metaspace_bpe_bos",
    "qwen2": "byte_level",
    "qwen3": "byte_level",
    "qwen3_moe": "byte_level",
    "phi3": "metaspace_bpe_bos",
    "gpt2": "byte_level_trimmed",
    "olmo2": "byte_level_trimmed",
    "granite": "wordpiece",
    "cohere": "byte_level",
}
PREFIX = {"metaspace_bpe_bos": ["<s>"], "wordpiece": ["[CLS]"]}
# The partner on the other side: a Qwen2 with a byte-level tokenizer (the same vocabulary as the byte-level
# families, a different one from the rest, so both KD paths run).
PARTNER = ("qwen2", "byte_level")
TEXT = "def greet(name):\n    return f'hello {name}'\n\n" + NON_ASCII + "\n"


def test_the_matrix_covers_every_family_and_tokenizer_kind():
    assert sorted(FAMILY_TOKENIZER) == sorted(FAMILIES)
    assert set(FAMILY_TOKENIZER.values()) == set(KINDS)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """A saved tiny model with its tokenizer per family (and the partner), and a small corpus."""
    root = tmp_path_factory.mktemp("families")
    out = {}
    for name, (family, kind) in [*((f, (f, k)) for f, k in FAMILY_TOKENIZER.items()), ("partner", PARTNER)]:
        tokenizer = tokenizer_of(kind)
        model = tiny_family_model(family, len(tokenizer), seed=1 if name == "partner" else 0)
        for key in ("bos", "eos", "pad"):
            setattr(model.config, f"{key}_token_id", getattr(tokenizer, f"{key}_token_id"))
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        out[name] = root / name
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps({"text": TEXT * (3 + i)}) + "\n" for i in range(6)))
    out["data"] = data
    return out


def _config(folders, teacher: Path, student: Path, out: Path) -> dict:
    return {
        "teacher": {"model": str(teacher)},
        "student": {"model": str(student), "init": "pretrained"},
        "data": {
            "train": [str(folders["data"])],
            "eval": [str(folders["data"])],
            "max_length": 32,
            "eval_max_windows": 2,
        },
        "train": {"max_steps": 1, "batch_size": 2, "seed": 0, "log_every": 1, "progress": False},
        "output_dir": str(out),
    }


@pytest.mark.parametrize("family", FAMILIES)
def test_family_conventions_head_eval_and_generate(family, folders):
    tokenizer = AutoTokenizer.from_pretrained(folders[family])
    model = AutoModelForCausalLM.from_pretrained(folders[family]).eval()
    fmt = input_format(tokenizer)
    assert tokenizer.convert_ids_to_tokens(list(fmt.prefix)) == PREFIX.get(FAMILY_TOKENIZER[family], [])

    windows = build_windows([str(folders["data"])], tokenizer, None, 32, 2)
    batch = collate_windows(windows, fmt, None)
    assert batch.student.input_ids[:, : len(fmt.prefix)].tolist() == [list(fmt.prefix)] * len(windows)
    check_head(model, batch.student.input_ids, batch.student.attention_mask, "student")

    metrics = evaluate_model(str(folders[family]), "student", EvalData([str(folders["data"])], 32, 2, 4))
    assert math.isfinite(metrics["bits_per_byte"]) and metrics["bits_per_byte"] > 0

    new = generate_ids(model, tokenizer, "def greet", max_new_tokens=3, exact_length=True)
    assert new.shape == (3,)


@pytest.mark.parametrize("role", ["teacher", "student"])
@pytest.mark.parametrize("family", FAMILIES)
def test_family_trains_one_step_as_teacher_and_as_student(family, role, folders, tmp_path):
    pair = (
        (folders[family], folders["partner"]) if role == "teacher" else (folders["partner"], folders[family])
    )
    summary = train(validate(_config(folders, *pair, tmp_path / "run")))
    assert summary["step"] == 1
    (step,) = metrics_records(tmp_path / "run", "train")
    assert math.isfinite(step["loss_kd"]) and step["loss_kd"] > 0 and math.isfinite(step["loss_lm"])
    assert step["skipped_steps"] == 0
    assert (tmp_path / "run" / "final" / "config.json").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final")
    assert all(torch.isfinite(p).all() for p in reloaded.parameters())
