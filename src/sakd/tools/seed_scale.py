"""`sakd bench --seed-scale`: a few real distillation steps at the reference pair's size, fp32 on the CPU.

The teacher is a Qwen3-MoE sized like the reference (hidden 1024, 28 layers, vocabulary 151,936, 8 experts of
which 2 per token: about 1.0 B parameters stored, 0.62 B active per token), the student a SmolLM-135M-sized
Llama (vocabulary 49,152), both with random weights from their configs. The two tokenizers differ: the teacher's
is word-level over exactly 151,936 entries, the student's a byte-level BPE of 49,152 trained here on the same
text, so the step runs the cross-tokenizer projection as with the real pair.

The steps are `sakd train`'s (`build_training` / `train_step` through the bench's `SakdStep`) with the default
config (KD + LM, EMA), in a fresh process whose peak resident size (VmHWM) over everything, loading included,
is compared with `sakd plan --device cpu`'s estimate for the same config.
"""

from __future__ import annotations

import json
import random
import statistics
import time
from pathlib import Path
from typing import Any

TEACHER = {
    "hidden_size": 1024,
    "num_hidden_layers": 28,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "num_experts": 8,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 768,
    "intermediate_size": 3072,
    "vocab_size": 151936,
    "tie_word_embeddings": False,
}
STUDENT = {  # SmolLM-135M's shape
    "hidden_size": 576,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "intermediate_size": 1536,
    "vocab_size": 49152,
    "tie_word_embeddings": True,
}
WORDS = 400_000  # corpus words: enough distinct ones for a 49,152-token BPE


def build_assets(spec: dict[str, Any]) -> dict[str, Any]:
    """Corpus, both tokenizers and both random models under spec["root"] (run in a fresh process, so that the
    bench's own process never holds the teacher)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3MoeConfig

    from sakd.models.tiny import train_tokenizer
    from sakd.tools.bench_pairs import word_tokenizer

    root = Path(spec["root"])
    rng = random.Random(0)
    lines = [
        " ".join(f"w{rng.randrange(TEACHER['vocab_size'] - 3)}" for _ in range(500))
        for _ in range(WORDS // 500)
    ]
    corpus = root / "corpus.jsonl"
    with corpus.open("w") as f:
        f.writelines(json.dumps({"text": line}) + "\n" for line in lines)
    positions = 2 * spec["max_length"]
    tokenizers = {
        "teacher": word_tokenizer(TEACHER["vocab_size"]),
        "student": train_tokenizer(lines, STUDENT["vocab_size"], split="gpt2"),
    }
    configs = {
        "teacher": Qwen3MoeConfig(**TEACHER, max_position_embeddings=positions),
        "student": LlamaConfig(**STUDENT, max_position_embeddings=positions),
    }
    params = {}
    for role, config in configs.items():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
        params[role] = sum(p.numel() for p in model.parameters())
        model.save_pretrained(root / role)
        tokenizers[role].save_pretrained(root / role)
        del model
    return {"corpus": str(corpus), "params": params, "vocab": {k: len(t) for k, t in tokenizers.items()}}


def seed_config(root: Path, batch_size: int, max_length: int):
    from sakd.config import validate

    raw = {
        "teacher": {"model": str(root / "teacher")},
        "student": {"model": str(root / "student"), "init": "pretrained"},
        "data": {"train": [str(root / "corpus.jsonl")], "max_length": max_length},
        "train": {"batch_size": batch_size, "progress": False, "precision": "fp32"},
        "output_dir": str(root / "run"),
    }
    return validate(raw)


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Set-up and `steps` timed steps after `warmup` untimed ones (run in a fresh process); the process's
    peak resident size at the end and after loading."""
    from accelerate import Accelerator

    from sakd.curriculum import curriculum_at
    from sakd.data.corpus import build_windows
    from sakd.tools.bench_loss import _proc_status_bytes
    from sakd.tools.bench_step import SakdStep, _prepared, _sakd_step, pair_loader

    cfg = seed_config(Path(spec["root"]), spec["batch_size"], spec["max_length"])
    accelerator = Accelerator(cpu=True, mixed_precision="no")
    start = time.perf_counter()
    sakd = SakdStep(cfg, accelerator, "fp32", curriculum_at(0.0, cfg.curriculum))
    setup_s = time.perf_counter() - start
    after_load = _proc_status_bytes("VmHWM")
    count = spec["warmup"] + spec["steps"]
    windows = build_windows(cfg.data.train, sakd.student_tok, sakd.teacher_tok, cfg.data.max_length)
    loader = pair_loader(windows, cfg.train.batch_size, sakd.student_tok, sakd.teacher_tok)
    batches = _prepared([loader.next_batch() for _ in range(count)], accelerator.device)
    rates = []
    for i, batch in enumerate(batches):
        begin = time.perf_counter()
        tokens = _sakd_step(sakd.training, sakd.point, [batch])
        if i >= spec["warmup"]:
            rates.append(tokens / (time.perf_counter() - begin))
    return {
        "tokens_per_s": statistics.median(rates),
        "step_tokens_per_s": [round(r, 2) for r in rates],
        "peak_bytes": _proc_status_bytes("VmHWM"),
        "peak_after_load_bytes": after_load,
        "setup_s": round(setup_s, 1),
        "objective": sakd.training.objective.kind,
    }


def run_seed_scale(root: Path, batch_size: int, max_length: int, warmup: int, steps: int) -> dict[str, Any]:
    """Build the pair, measure the steps, and the plan's estimate for the same config on the CPU."""
    from sakd.tools.bench_loss import in_fresh_process
    from sakd.tools.plan_memory import GIB, estimate

    root.mkdir(parents=True, exist_ok=True)
    spec = {"root": str(root), "batch_size": batch_size, "max_length": max_length}
    built = in_fresh_process("sakd.tools.seed_scale:build_assets", {**spec, "threads": 0})
    if "error" in built:
        return {"error": built["error"]}
    measured = in_fresh_process(
        "sakd.tools.seed_scale:measure", {**spec, "warmup": warmup, "steps": steps, "threads": 0}
    )
    if "error" in measured:
        return {"error": measured["error"], **built}
    plan = estimate(seed_config(root, batch_size, max_length), "fp32", device="cpu")
    return {
        **built,
        **measured,
        "batch_size": batch_size,
        "max_length": max_length,
        "steps": steps,
        "peak_gib": measured["peak_bytes"] / GIB,
        "plan_gib": plan.total / GIB,
        "plan_parts_gib": {k: round(v / GIB, 3) for k, v in plan.parts.items()},
        "plan_error": (plan.total - measured["peak_bytes"]) / measured["peak_bytes"],
    }
