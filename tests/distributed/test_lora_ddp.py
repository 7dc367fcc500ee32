"""A LoRA student on two processes (DDP over the adapters only): the same adapters as one process of the
same global batch, and one process writes the checkpoints and the merged final/ folder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from dist_helpers import run_two
from helpers import write_yaml
from safetensors.torch import load_file

from sakd.config import validate
from sakd.train.loop import train

LORA = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]}


def test_two_processes_train_the_same_adapters_as_one(make_dist_raw):
    pytest.importorskip("peft")
    two = make_dist_raw("lora-two", max_steps=3)
    two["student"]["lora"] = LORA
    proc = run_two(write_yaml(two, Path(two["output_dir"]).with_suffix(".yaml")))
    assert proc.returncode == 0, proc.stderr[-4000:]
    one = make_dist_raw("lora-one", max_steps=3, batch_size=4)
    one["student"]["lora"] = LORA
    train(validate(one))

    ckpts = [Path(r["output_dir"]) / "checkpoints" / "step-000003" for r in (two, one)]
    weights = [load_file(str(c / "student.safetensors")) for c in ckpts]
    assert weights[0].keys() == weights[1].keys() and all("lora_" in k for k in weights[0])
    for name in weights[0]:
        torch.testing.assert_close(weights[0][name], weights[1][name], rtol=0, atol=1e-5)
    assert any("lora_B" in k and bool(v.abs().sum()) for k, v in weights[0].items())
    assert (Path(two["output_dir"]) / "final" / "adapter" / "adapter_config.json").is_file()
