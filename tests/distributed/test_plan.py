"""`sakd plan`: exact parameter counts, the suggested batch size, errors, and the estimate against the peak
memory of real processes.

How the estimate compares with a measurement on CPU: the measurements run in a fresh subprocess that reads its
peak resident set size before and after the part measured, after a warm-up on a one-layer copy of the model
(lazy imports, the autograd engine and AdamW's code cost memory too, but are not the model's). The peak is
/proc/self/status's VmHWM: `ru_maxrss` would do in a process started from a shell, but Linux carries it over
from the parent through fork and exec, so under pytest it starts at pytest's own size.
Weights, gradients and AdamW states are plain tensors, so the estimate is close (within ~10%); the total of a
real `sakd train` run also holds tokenized data, the vocabulary projection and the allocator's slack, so only
a factor of 2 is asserted there.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import write_yaml
from transformers import AutoModelForCausalLM

from sakd.cli import main
from sakd.config import validate
from sakd.errors import UserError
from sakd.models.tiny import dense_student_config, moe_teacher_config
from sakd.tools.plan import parse_size
from sakd.tools.plan_memory import GIB, HEADROOM, estimate

MEASURE = r"""
import json, sys
import torch
from transformers import AutoConfig, AutoModelForCausalLM

def peak():  # this process's peak resident memory (VmHWM): unlike ru_maxrss it starts afresh at exec
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))

torch.set_num_threads(1)
student_path, teacher_path, config_path = sys.argv[1:4]
def warm_up(path):
    config = AutoConfig.from_pretrained(path)
    small = config.__class__(**{**config.to_dict(), "num_hidden_layers": 1, "vocab_size": 64})
    warm = AutoModelForCausalLM.from_config(small)
    ids = torch.randint(0, 64, (1, 8))
    warm(input_ids=ids, labels=ids).loss.backward()
    torch.optim.AdamW(warm.parameters(), foreach=False).step()

if config_path == "-":
    warm_up(teacher_path)
    base = peak()
    teacher = AutoModelForCausalLM.from_pretrained(teacher_path, dtype=torch.bfloat16)
    teacher_bytes = peak() - base
    warm_up(student_path)
    base = peak()
    student = AutoModelForCausalLM.from_pretrained(student_path, dtype=torch.float32)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3, foreach=False)
    ids = torch.randint(0, student.config.vocab_size, (1, 8))
    student(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    print(json.dumps({"teacher": teacher_bytes, "student": peak() - base}))
else:
    import matplotlib.pyplot  # noqa: F401 (the report at the end of training draws plots)
    from sakd.config import load_config
    from sakd.tools.plan_memory import estimate
    from sakd.train import inputs, loop

    cfg = load_config(config_path)
    plan = estimate(cfg)  # also imports the models' code
    build_windows = inputs.build_windows
    base = {}

    def windows_then_base(*args, **kwargs):  # tokenized data stays in host memory, never on the device
        windows = build_windows(*args, **kwargs)
        base.setdefault("after_data", peak())
        return windows

    inputs.build_windows = windows_then_base
    loop.train(cfg)
    print(json.dumps({"train": peak() - base["after_data"], "estimate": plan.total}))
"""


def _plan_raw(base_config) -> dict:
    raw = {**base_config, "train": {**base_config["train"], "batch_size": 4, "grad_accum": 8}}
    raw["data"] = {**base_config["data"], "max_length": 64}
    return raw


def test_parameter_counts_are_exact(base_config, assets):
    plan = estimate(validate(_plan_raw(base_config)), "fp32")
    for shape, folder in ((plan.student, assets["student"]), (plan.teacher, assets["teacher"])):
        model = AutoModelForCausalLM.from_pretrained(folder)
        assert shape.params == sum(p.numel() for p in model.parameters())
    assert plan.parts["student weights, grads, AdamW"] == 16 * plan.student.params
    assert plan.parts["teacher weights"] == 4 * plan.teacher.params  # fp32: the teacher's dtype follows
    assert plan.parts["student EMA"] == 4 * plan.student.params
    assert "autocast 16-bit weights" not in plan.parts
    half = estimate(validate(_plan_raw(base_config)), "fp16")
    assert half.parts["teacher weights"] == 2 * plan.teacher.params
    assert plan.parts["student activations"] / 2 < half.parts["student activations"]
    assert half.parts["student activations"] < plan.parts["student activations"]  # 16-bit activations


def test_the_chunk_likelihood_term_adds_one_student_row_tensor_per_chunk(base_config, assets):
    """On by default across tokenizers: one more (rows x V_s) fp32 tensor in the loss than with it off, and
    nothing more with one tokenizer or a teacher cache, where it does not run."""
    raw = _plan_raw(base_config)
    on = estimate(validate(raw), "fp32")
    off = estimate(validate({**raw, "distill": {"chunk_likelihood_weight": 0.0}}), "fp32")
    rows = min(raw["train"]["batch_size"] * raw["data"]["max_length"], 1024)
    extra = on.parts["loss (one chunk)"] - off.parts["loss (one chunk)"]
    assert extra == rows * on.student.vocab * 4
    same = {**raw, "student": {**raw["student"], "model": str(assets["student_same"])}}
    assert (
        estimate(validate(same), "fp32").parts["loss (one chunk)"]
        == estimate(validate({**same, "distill": {"chunk_likelihood_weight": 0.0}}), "fp32").parts[
            "loss (one chunk)"
        ]
    )


def test_a_lora_student_counts_optimizer_state_for_its_adapters_only(base_config, assets):
    """LoRA: the frozen weights at 4 B, the adapters (r x (in + out) per target, counted by hand) at 16 B and
    in the EMA, no head gradient in the loss; FSDP with LoRA is refused as training refuses it."""
    pytest.importorskip("peft")
    raw = _plan_raw(base_config)
    full = estimate(validate(raw), "fp32")
    raw["student"] = {**raw["student"], "lora": {"r": 4, "target_modules": ["q_proj", "v_proj"]}}
    lora = estimate(validate(raw), "fp32")
    model = AutoModelForCausalLM.from_pretrained(assets["student"])
    adapters = sum(
        4 * (m.in_features + m.out_features)
        for n, m in model.named_modules()
        if n.endswith(("q_proj", "v_proj"))
    )
    assert adapters == 2 * 2 * 4 * (32 + 32)  # 2 layers, 2 targets of 32 x 32
    p = full.student.params
    assert "student weights, grads, AdamW" not in lora.parts
    assert lora.parts["student frozen weights"] == 4 * p
    assert lora.parts["LoRA adapters, grads, AdamW"] == 16 * adapters
    assert lora.parts["student EMA"] == 4 * adapters
    head_grad = full.student.vocab * full.student.hidden * 4
    assert lora.parts["loss (one chunk)"] == full.parts["loss (one chunk)"] - head_grad
    assert full.total - lora.total == 12 * p + 4 * p - 20 * adapters + head_grad
    raw["train"]["strategy"] = "fsdp"
    with pytest.raises(UserError, match="fsdp"):
        estimate(validate(raw), "fp32", processes=2)


def test_suggests_the_largest_power_of_two_batch_that_fits(base_config, tmp_path, capsys):
    """A device that holds 10 windows per micro-batch: batch 8 and accumulation 4 keep the config's 32
    windows per optimizer step; the estimate at the largest batch that fits is within the usable memory and
    one more window is not."""
    raw = _plan_raw(base_config)
    config = write_yaml(raw, tmp_path / "plan.yaml")

    def total(batch: int) -> int:
        return estimate(validate({**raw, "train": {**raw["train"], "batch_size": batch}}), "fp16").total

    memory = int(total(10) / (1 - HEADROOM)) + 1
    assert (
        main(
            ["plan", str(config), "--device-memory", f"{memory}B", "--precision", "fp16", "--format", "json"]
        )
        == 0
    )
    sug = json.loads(capsys.readouterr().out)["suggestion"]
    assert sug["fits"] and sug["largest_batch_that_fits"] == 10
    assert (sug["batch_size"], sug["grad_accum"], sug["windows_per_step"]) == (8, 4, 32)
    usable = memory * (1 - HEADROOM)
    assert total(10) <= usable < total(11) and sug["total_at_suggestion"] == total(8)
    assert sug["teacher_placement"] == "replicate"

    assert main(["plan", str(config), "--device-memory", "16GB"]) == 0
    text = capsys.readouterr().out
    assert "train.batch_size 32, train.grad_accum 1" in text and "teacher.placement: replicate" in text
    assert main(["plan", str(config), "--device-memory", "1MB"]) == 0
    assert "even one window does not fit" in capsys.readouterr().out


def test_sharding_and_offload_divide_the_right_parts(base_config):
    """FSDP divides the student's weights, gradients, AdamW state and EMA by the processes; a sharded teacher
    keeps 1/processes of its weights plus one gathered layer; an offloaded one keeps one layer plus the
    embeddings and head."""
    raw = _plan_raw(base_config)
    plain = estimate(validate(raw), "fp32")
    t, s = plain.teacher, plain.student
    raw["train"]["strategy"] = "fsdp"
    sharded = estimate(validate(raw), "fp32", processes=4, placement="shard")
    assert sharded.parts["student weights, grads, AdamW"] == 16 * -(-s.params // 4)
    assert sharded.parts["student EMA"] == 4 * -(-s.params // 4)
    layer = (t.params - 2 * t.vocab * t.hidden) // t.layers
    assert sharded.parts["teacher weights"] == 4 * (-(-t.params // 4) + layer)
    offload = estimate(validate(raw), "fp32", processes=1, placement="offload")
    assert offload.parts["teacher weights"] == 4 * (layer + 2 * t.vocab * t.hidden)
    assert offload.parts["student weights, grads, AdamW"] == 16 * s.params  # one process: nothing to shard
    for key in ("student activations", "loss (one chunk)"):
        assert sharded.parts[key] == plain.parts[key]


def test_a_teacher_too_big_to_replicate_gets_another_placement(base_config):
    """The device holds everything but the full teacher: several processes shard it, one process offloads it."""
    raw = _plan_raw(base_config)
    full = estimate(validate(raw), "fp32")
    one_window = estimate(validate({**raw, "train": {**raw["train"], "batch_size": 1}}), "fp32").total
    smaller = max(
        estimate(validate(raw), "fp32", processes=4, placement="shard").parts["teacher weights"],
        estimate(validate(raw), "fp32", placement="offload").parts["teacher weights"],
    )
    assert smaller < full.parts["teacher weights"]
    memory = int((one_window - (full.parts["teacher weights"] - smaller) // 2) / (1 - HEADROOM))
    assert estimate(validate(raw), "fp32", memory, processes=4).suggestion["teacher_placement"] == "shard"
    assert estimate(validate(raw), "fp32", memory, processes=1).suggestion["teacher_placement"] == "offload"
    roomy = estimate(validate(raw), "fp32", 100 * full.total, processes=4)
    assert roomy.suggestion["teacher_placement"] == "replicate"


def test_an_unreachable_hub_id_is_one_error_line(base_config, tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # fail at once, no retries
    raw = {**base_config, "teacher": {"model": "huihui-ai/Huihui-MoE-1B-A0.6B"}}
    config = write_yaml(raw, tmp_path / "hub.yaml")
    assert main(["plan", str(config)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: cannot read the teacher config from 'huihui-ai/Huihui-MoE-1B-A0.6B'")


def test_sizes():
    assert parse_size("16GB") == parse_size("16 GiB") == parse_size("16") == 16 * GIB
    assert parse_size("12000MB") == 12000 * 1024**2 and parse_size("512B") == 512
    with pytest.raises(UserError, match="not a size"):
        parse_size("lots")


@pytest.fixture(scope="module")
def measured_models(assets, tmp_path_factory) -> dict[str, Path]:
    """A student of 5.5 M parameters (88 MB of fp32 weights, gradients and AdamW states) and an MoE teacher of
    11 M saved in bf16, large enough to stand out of the process's noise; tokenizers from the tiny assets."""
    root = tmp_path_factory.mktemp("measured")
    torch.manual_seed(0)
    student = AutoModelForCausalLM.from_config(
        dense_student_config(8192, 256, layers=4, heads=4, max_length=64)
    )
    student.save_pretrained(root / "student")
    teacher = AutoModelForCausalLM.from_config(
        moe_teacher_config(8192, 256, layers=4, heads=4, experts=8, max_length=64)
    ).to(torch.bfloat16)
    teacher.save_pretrained(root / "teacher")
    for name in ("student", "teacher"):
        for f in assets[name].glob("*token*"):
            shutil.copy(f, root / name / f.name)
    return {"student": root / "student", "teacher": root / "teacher", "root": root}


def _measure(models: dict[str, Path], config: str) -> dict:
    script = models["root"] / "measure.py"
    script.write_text(MEASURE)
    proc = subprocess.run(
        [sys.executable, str(script), str(models["student"]), str(models["teacher"]), config],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_estimate_against_measured_peak_memory(base_config, assets, measured_models, tmp_path):
    raw = {
        **base_config,
        "teacher": {"model": str(measured_models["teacher"]), "dtype": "bf16"},
        "student": {"model": str(measured_models["student"])},
        "data": {"train": [str(assets["train"])], "max_length": 64},
        "train": {**base_config["train"], "max_steps": 2, "batch_size": 4, "precision": "fp32"},
    }
    raw["data"]["eval"] = []
    raw["train"]["tensorboard"] = False
    plan = estimate(validate(raw))
    weights = _measure(measured_models, "-")
    student_ratio = weights["student"] / plan.parts["student weights, grads, AdamW"]
    teacher_ratio = weights["teacher"] / plan.parts["teacher weights"]
    total = _measure(measured_models, str(write_yaml(raw, tmp_path / "measure.yaml")))
    total_ratio = total["train"] / total["estimate"]
    print(
        f"measured / estimated: student weights+grads+AdamW {student_ratio:.2f}, teacher bf16 weights "
        f"{teacher_ratio:.2f}, whole training run {total_ratio:.2f} ({total['train'] / 2**20:.0f} MiB measured)"
    )
    assert 0.5 < student_ratio < 2 and 0.5 < teacher_ratio < 2
    assert 0.5 < total_ratio < 2


PEAK_OF_A_RUN = r"""
import json, sys
import torch
import matplotlib.pyplot  # noqa: F401 (the report at the end of training draws plots)
from sakd.config import load_config
from sakd.train import loop

torch.set_num_threads(1)
loop.train(load_config(sys.argv[1]))
with open("/proc/self/status") as f:
    print(json.dumps({"peak": next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))}))
"""


def test_cpu_fp32_plan_against_the_peak_of_a_real_cpu_run(base_config, assets, measured_models, tmp_path):
    """`--device cpu` estimates a whole CPU process in fp32 (runtime, fp32 teacher, no autocast copies); its
    total is compared with the peak resident size of a fresh `sakd train` process of the same config."""
    raw = {
        **base_config,
        "teacher": {"model": str(measured_models["teacher"])},
        "student": {"model": str(measured_models["student"])},
        "data": {"train": [str(assets["train"])], "max_length": 64, "eval": []},
        "train": {**base_config["train"], "max_steps": 2, "batch_size": 4, "precision": "auto"},
    }
    raw["train"]["tensorboard"] = False
    cfg = validate(raw)
    cpu, gpu = estimate(cfg, device="cpu"), estimate(cfg)
    assert cpu.precision == "fp32" and gpu.precision == "auto"
    assert "autocast 16-bit weights" in gpu.parts and "autocast 16-bit weights" not in cpu.parts
    teacher_params = cpu.teacher.params
    assert cpu.parts["teacher weights"] == 4 * teacher_params  # the bf16 checkpoint trains in fp32 on the CPU
    assert cpu.parts["runtime (Python, torch, libraries)"] > 0
    script = tmp_path / "peak.py"
    script.write_text(PEAK_OF_A_RUN)
    proc = subprocess.run(
        [sys.executable, str(script), str(write_yaml(raw, tmp_path / "cpu.yaml"))],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    peak = json.loads(proc.stdout.strip().splitlines()[-1])["peak"]
    print(f"CPU fp32 run: measured peak {peak / 2**20:.0f} MiB, plan {cpu.total / 2**20:.0f} MiB")
    assert 0.67 < peak / cpu.total < 1.5
