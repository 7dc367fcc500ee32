"""The example configs in configs/: every one is valid, says how to launch it, and plans."""

from __future__ import annotations

from pathlib import Path

import pytest

from sakd.cli import main
from sakd.config import read_yaml, validate

CONFIGS = sorted((Path(__file__).parents[2] / "configs").glob("*.yaml"))


def test_the_example_configs_are_shipped():
    names = {p.name for p in CONFIGS}
    assert {"smollm-from-qwen3moe-1gpu.yaml", "smollm-from-qwen3moe-8gpu.yaml"} <= names
    assert "smollm-from-qwen3moe-2nodes.yaml" in names


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_shipped_config_is_valid_and_says_how_to_launch_it(path):
    cfg = validate(read_yaml(path), check_files=False)
    assert (
        cfg.teacher.model == "huihui-ai/Huihui-MoE-1B-A0.6B"
        and cfg.student.model == "HuggingFaceTB/SmolLM-135M"
    )
    assert cfg.data.train[0].hf == "wikitext" and cfg.data.train[0].config == "wikitext-103-raw-v1"
    header = path.read_text().split("\nteacher:")[0]
    assert f"sakd train configs/{path.name}" in header
    if "1gpu" in path.name:
        assert cfg.train.precision == "fp16" and cfg.teacher.dtype == "fp16"  # a P100 has no bf16
    else:
        assert "torchrun" in header and "accelerate launch" in header and "untested" in header.lower()


def test_the_one_gpu_config_plans_on_stand_in_models(assets, capsys):
    """The hub is out of reach here: the tiny models stand in for the teacher and the student."""
    config = next(p for p in CONFIGS if "1gpu" in p.name)
    overrides = ["--set", f"teacher.model={assets['teacher']}", "--set", f"student.model={assets['student']}"]
    assert main(["plan", str(config), *overrides, "--device-memory", "16GB"]) == 0
    out = capsys.readouterr().out
    assert "fp16, micro-batch 8 x 512 tokens" in out and "train.batch_size" in out
