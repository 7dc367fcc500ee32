"""FSDP2 on two CPU processes (torchrun, gloo): a sharded student (and a sharded teacher) reach the same weights
as one process of the same global batch; checkpoints hold full weights, so runs move between FSDP and one
process (the way back is in test_data_parallel); final/ is a complete Hugging Face folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from dist_helpers import cut_after, run_two
from helpers import write_yaml
from test_data_parallel import ATOL, _ckpt, _max_diff, _records
from transformers import AutoModelForCausalLM

from sakd.config import validate
from sakd.train.loop import train


@pytest.fixture(scope="session")
def fsdp_run(make_dist_raw) -> Path:
    """6 steps, 2 processes of batch 2, student sharded (train.strategy fsdp), teacher sharded too; held-out
    evaluations (raw and EMA weights swapped in and out of the shards) at steps 2 and 4 must not disturb
    training, which is compared with a run that does not evaluate."""
    raw = make_dist_raw("fsdp", strategy="fsdp", eval_every=2)
    raw["teacher"]["placement"] = "shard"
    proc = run_two(write_yaml(raw, Path(raw["output_dir"]).with_suffix(".yaml")))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr
    summary = json.loads((Path(raw["output_dir"]) / "summary.json").read_text())
    assert summary["sharded"] == {"student": True, "teacher": True}  # not silently replicated
    return Path(raw["output_dir"])


def test_fsdp_of_two_processes_equals_one_process(fsdp_run, one_process_run):
    for step in (3, 6):
        diff = _max_diff(_ckpt(fsdp_run, step), _ckpt(one_process_run, step))
        print(f"FSDP step {step}: max abs difference of student and EMA weights vs 1 process: {diff:.2e}")
        assert diff < ATOL
    mine, theirs = _records(fsdp_run, "train"), _records(one_process_run, "train")
    for key in ("loss", "grad_norm", "lr"):
        assert [r[key] for r in mine] == pytest.approx([r[key] for r in theirs], rel=1e-5), key


def test_fsdp_final_folder_holds_the_full_student(fsdp_run, one_process_run):
    sharded = AutoModelForCausalLM.from_pretrained(fsdp_run / "final")
    plain = AutoModelForCausalLM.from_pretrained(one_process_run / "final")
    a, b = sharded.state_dict(), plain.state_dict()
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < ATOL


def test_fsdp_checkpoint_resumes_on_one_process(fsdp_run, one_process_run, make_dist_raw):
    raw = make_dist_raw("fsdp-then-one", batch_size=4)
    run = Path(raw["output_dir"])
    cut_after(fsdp_run, run, 3)
    summary = train(validate(raw), resume="auto")
    assert summary["step"] == 6 and _records(run, "resume")[-1]["step"] == 3
    assert _max_diff(_ckpt(run, 6), _ckpt(one_process_run, 6)) < ATOL


def test_fsdp_evaluation_adds_up_despite_an_uneven_split(fsdp_run, one_process_run):
    """5 held-out batches over two sharded processes: the one with 2 repeats a batch (its forwards are
    collectives) without counting it."""
    fsdp = json.loads((fsdp_run / "summary.json").read_text())["eval"]
    one = json.loads((one_process_run / "summary.json").read_text())["eval"]
    for weights in ("raw", "ema"):
        assert (fsdp[weights]["tokens"], fsdp[weights]["bytes"]) == (
            one[weights]["tokens"],
            one[weights]["bytes"],
        )
        assert fsdp[weights]["bits_per_byte"] == pytest.approx(one[weights]["bits_per_byte"], rel=1e-5)
    assert fsdp["distill_loss"] == pytest.approx(one["distill_loss"], rel=1e-5)


def test_fsdp_students_sample_their_own_text_in_step(make_dist_raw):
    """On-policy micro-batches on a sharded student: every process samples (each layer's weights gathered
    for each forward) the same number of forwards, so no process waits for another forever, and every
    micro-batch of every step is the student's own text."""
    raw = make_dist_raw("fsdp-on-policy", strategy="fsdp", max_steps=3)
    raw["distill"] = {"on_policy_fraction": 1.0, "on_policy_prompt_tokens": 8, "on_policy_new_tokens": 12}
    proc = run_two(write_yaml(raw, Path(raw["output_dir"]).with_suffix(".yaml")))
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = _records(Path(raw["output_dir"]), "train")
    assert [r["sampled_batches"] for r in records] == [1, 1, 1]  # the main process's, one per step
    assert all(r["loss"] == r["loss"] for r in records)
