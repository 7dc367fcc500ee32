"""End to end with the real CLI on CPU (STYLE habit 5): train across tokenizers -> SIGKILL at a checkpoint ->
resume -> `sakd eval` -> load the exported student with transformers and generate."""

from __future__ import annotations

import copy
import json
import math
import re
import signal
from pathlib import Path

import pytest
import torch
import yaml
from helpers import CLIRun, metrics_records, write_yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from sakd.config import validate
from sakd.train import checkpoint


def test_train_kill_resume_eval_export(base_config, assets, tmp_path):
    raw = copy.deepcopy(base_config)
    raw["data"].update(max_length=32, eval_max_windows=4)
    # the curriculum's three phases (KD + LM, + feature/attention, + router and the rest) all run
    raw["curriculum"] = {
        "weights": {
            "feature": 0.5,
            "attention": 0.5,
            "router": 0.5,
            "balance": 0.01,
            "layerwise": 0.5,
            "contrastive": 0.1,
            "token_weighting": 1.0,
        }
    }
    raw["train"].update(max_steps=4, batch_size=1, grad_accum=2, save_every=1, keep_last=3, eval_every=2)
    run = Path(raw["output_dir"])
    config = write_yaml(raw, tmp_path / "config.yaml")

    first = CLIRun("train", str(config), logs=tmp_path / "first")
    first.wait_for(run / "checkpoints" / "step-000002" / "manifest.json")
    first.signal(signal.SIGKILL)
    assert first.finish()[0] == -signal.SIGKILL
    assert not (run / "final").exists()

    code, out, err = CLIRun("train", str(config), "--resume", "auto", logs=tmp_path / "second").finish()
    assert code == 0, err
    assert "Traceback" not in err and "done: 4 steps" in out

    # the run folder
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert validate(resolved).model_dump(mode="json") == resolved
    assert resolved["train"]["max_steps"] == 4 and resolved["output_dir"] == str(run)
    environment = json.loads((run / "environment.json").read_text())
    assert {"torch", "transformers", "device", "precision", "num_processes"} <= environment.keys()
    records = metrics_records(run)
    resumes = [r for r in records if r.get("event") == "resume"]
    assert len(resumes) == 1 and 2 <= resumes[0]["step"] < 4
    train_records = [r for r in records if r.get("event") == "train"]
    assert {r["step"] for r in train_records} == set(range(1, 5))
    after_resume = [r["step"] for r in records[records.index(resumes[0]) :] if r.get("event") == "train"]
    assert after_resume == list(range(resumes[0]["step"] + 1, 5)), "one line per step after the resume"
    for r in train_records:
        assert {"step", "lr", "loss", "loss_lm", "loss_kd", "tokens_per_s"} <= r.keys()
        assert r["lr"] > 0 and math.isfinite(r["loss"]) and r["tokens_per_s"] > 0
    assert {r["step"] for r in records if r.get("event") == "eval"} == {2, 4}
    assert {"loss_router", "loss_feature"} <= train_records[-1].keys(), "the last phase must have run"
    ckpts = checkpoint.list_checkpoints(run / "checkpoints")
    assert [p.name for p in ckpts] == ["step-000002", "step-000003", "step-000004"]
    for p in ckpts:
        assert re.fullmatch(r"step-\d{6}", p.name) and checkpoint.verify(p) is None
    final = run / "final"
    assert {"config.json", "model.safetensors", "tokenizer.json", "sakd.json"} <= {
        p.name for p in final.iterdir()
    }

    # sakd eval on the exported student and the teacher
    out_json = tmp_path / "eval" / "out.json"
    code, out, err = CLIRun(
        "eval",
        "--student",
        str(final),
        "--teacher",
        str(assets["teacher"]),
        "--data",
        str(assets["eval"]),
        "--output",
        str(out_json),
        "--max-length",
        "32",
        "--max-windows",
        "4",
        "--gen-new-tokens",
        "0",
        logs=tmp_path / "eval",
    ).finish()
    assert code == 0, err
    result = json.loads(out_json.read_text())
    for role in ("student", "teacher"):
        m = result[role]
        assert {"perplexity", "bits_per_byte", "parameters", "loss"} <= m.keys()
        assert math.isfinite(m["perplexity"]) and m["perplexity"] == pytest.approx(
            math.exp(m["loss"]), rel=1e-12
        )
        assert 0 < m["bits_per_byte"] < 20
    student = AutoModelForCausalLM.from_pretrained(final)
    assert result["student"]["parameters"] == sum(p.numel() for p in student.parameters())
    assert result["teacher"]["parameters"] > result["student"]["parameters"]
    assert "student" in out and "teacher" in out

    # the export loads with plain transformers and generates
    tokenizer = AutoTokenizer.from_pretrained(final)
    assert tokenizer.is_fast
    prompt = tokenizer("def bisect(a, x):", return_tensors="pt")
    with torch.no_grad():
        generated = student.generate(
            **prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    assert generated.shape[1] == prompt["input_ids"].shape[1] + 4
    assert isinstance(tokenizer.decode(generated[0]), str)
