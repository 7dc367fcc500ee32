"""`sakd bench --seed-scale`: a few real distillation steps at the reference pair's size, fp32 on the CPU or
in the bench's precision on a GPU.

The teacher is a Qwen3-MoE sized like the reference (hidden 1024, 28 layers, vocabulary 151,936, 8 experts of
which 2 per token: about 1.0 B parameters stored, 0.62 B active per token), the student a SmolLM-135M-sized
Llama (vocabulary 49,152), both with random weights from their configs. The two tokenizers differ: the teacher's
is word-level over exactly 151,936 entries, the student's a byte-level BPE of 49,152 trained here on the same
text, so the step runs the cross-tokenizer projection as with the real pair.

The steps are `sakd train`'s (`build_training` / `train_step` through the bench's `SakdStep`) with the default
config (KD + LM, EMA) and the bench's `--set` overrides, in a fresh process. Its peak memory over everything,
loading included, is compared with `sakd plan`'s estimate for the same config and device kind: on the CPU the
process's peak resident size (VmHWM), on a GPU the CUDA allocator's peak (`torch.cuda.max_memory_allocated`).
"""

from __future__ import annotations

import json
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass
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


ASSETS = "assets.json"  # written once the pair is built; it names the shapes it was built with


def _shapes(max_length: int) -> dict[str, Any]:
    return {"teacher": TEACHER, "student": STUDENT, "words": WORDS, "positions": 2 * max_length}


def _built(root: Path, max_length: int) -> dict[str, Any] | None:
    """The pair already built in `root` with these shapes and room for `max_length` tokens, else None: a
    second run reuses the models (about 4.5 GB) instead of building them again."""
    try:
        built = json.loads((root / ASSETS).read_text())
    except (OSError, ValueError):
        return None
    shapes = built.pop("shapes", None)
    if not isinstance(shapes, dict) or shapes.get("positions", 0) < 2 * max_length:
        return None
    if {**shapes, "positions": 2 * max_length} != _shapes(max_length):
        return None
    return built


def seed_config(root: Path, batch_size: int, max_length: int, precision: str = "fp32", overrides=()):
    from sakd.config import apply_overrides, validate

    raw = {
        "teacher": {"model": str(root / "teacher")},
        "student": {"model": str(root / "student"), "init": "pretrained"},
        "data": {"train": [str(root / "corpus.jsonl")], "max_length": max_length},
        "train": {"batch_size": batch_size, "progress": False, "precision": precision},
        "output_dir": str(root / "run"),
    }
    return validate(apply_overrides(raw, list(overrides)))


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Set-up and `steps` timed steps after `warmup` untimed ones (run in a fresh process); the peak memory
    (CPU: the process's resident size; GPU: the CUDA allocator's) at the end and after loading."""
    import torch

    from sakd.curriculum import curriculum_at
    from sakd.data.corpus import build_windows
    from sakd.tools.bench_step import SakdStep, _prepared, _sakd_step, pair_loader
    from sakd.train.run import make_accelerator
    from sakd.train.tracking import peak_memory

    precision = spec["precision"]
    cfg = seed_config(
        Path(spec["root"]), spec["batch_size"], spec["max_length"], precision, spec["overrides"]
    )
    cuda = spec["device"] == "cuda"
    accelerator = make_accelerator(precision, cpu=not cuda)
    start = time.perf_counter()
    sakd = SakdStep(cfg, accelerator, precision, curriculum_at(0.0, cfg.curriculum))
    setup_s = time.perf_counter() - start
    after_load = peak_memory(accelerator.device)["bytes"]
    count = spec["warmup"] + spec["steps"]
    windows = build_windows(cfg.data.train, sakd.student_tok, sakd.teacher_tok, cfg.data.max_length)
    loader = pair_loader(windows, cfg.train.batch_size, sakd.student_tok, sakd.teacher_tok)
    batches = _prepared([loader.next_batch() for _ in range(count)], accelerator.device)
    rates = []
    for i, batch in enumerate(batches):
        begin = time.perf_counter()
        tokens = _sakd_step(sakd.training, sakd.point, [batch])
        if cuda:  # the step queues its kernels: time them, not their launch
            torch.cuda.synchronize()
        if i >= spec["warmup"]:
            rates.append(tokens / (time.perf_counter() - begin))
    peak = peak_memory(accelerator.device)
    return {
        "tokens_per_s": statistics.median(rates),
        "step_tokens_per_s": [round(r, 2) for r in rates],
        "peak_bytes": peak["bytes"],
        "peak_after_load_bytes": after_load,
        "peak_method": peak["method"],
        "setup_s": round(setup_s, 1),
        "objective": sakd.training.objective.kind,
    }


@dataclass(frozen=True)
class SeedScale:
    """What part (f) runs: the batch, the timed steps after `warmup` untimed ones, the device kind ("cpu" or
    "cuda"), the training precision, and `--set` overrides of the run config."""

    batch_size: int
    max_length: int
    warmup: int
    steps: int
    device: str = "cpu"
    precision: str = "fp32"
    overrides: tuple[str, ...] = ()


def run_seed_scale(root: Path, run: SeedScale) -> dict[str, Any]:
    """Build the pair, measure the steps, and the plan's estimate for the same config and device kind."""
    from sakd.tools.bench_loss import in_fresh_process
    from sakd.tools.plan_memory import GIB, estimate

    root.mkdir(parents=True, exist_ok=True)
    batch_size, max_length = run.batch_size, run.max_length
    spec = {"root": str(root), "batch_size": batch_size, "max_length": max_length}
    built = _built(root, max_length)
    if built is None:
        built = in_fresh_process("sakd.tools.seed_scale:build_assets", {**spec, "threads": 0})
        if "error" in built:
            return {"error": built["error"]}
        (root / ASSETS).write_text(json.dumps({"shapes": _shapes(max_length), **built}))
    measure_spec = {**spec, **asdict(run), "overrides": list(run.overrides), "threads": 0}
    measured = in_fresh_process("sakd.tools.seed_scale:measure", measure_spec)
    if "error" in measured:
        return {"error": measured["error"], **built}
    cfg = seed_config(root, batch_size, max_length, run.precision, run.overrides)
    plan = estimate(cfg, run.precision, device=run.device)
    return {
        **built,
        **measured,
        "batch_size": batch_size,
        "max_length": max_length,
        "steps": run.steps,
        "device": run.device,
        "precision": run.precision,
        "overrides": list(run.overrides),
        "peak_gib": measured["peak_bytes"] / GIB,
        "plan_gib": plan.total / GIB,
        "plan_parts_gib": {k: round(v / GIB, 3) for k, v in plan.parts.items()},
        "plan_error": (plan.total - measured["peak_bytes"]) / measured["peak_bytes"],
    }


def seed_scale_part(result: dict[str, Any], args, root: Path, device, precision: str) -> None:
    """The bench's part (f), from its flags `args`, in `root`; its keys stay None unless --seed-scale."""
    keys = ("seed_scale_tokens_per_s", "seed_scale_peak_gib", "plan_error")
    result.update(dict.fromkeys(keys))
    if not args.seed_scale:
        return
    print(
        f"(f) seed scale: 1 B MoE teacher into a 135 M student, {precision} {device.type} ...",
        file=sys.stderr,
    )
    run = SeedScale(
        args.seed_batch_size,
        args.seed_max_length,
        1,
        args.seed_steps,
        device.type,
        precision,
        tuple(args.set),
    )
    seed = run_seed_scale(root, run)
    result["seed_scale"] = seed
    if "error" not in seed:
        result["seed_scale_tokens_per_s"] = seed["tokens_per_s"]
        result["seed_scale_peak_gib"] = seed["peak_gib"]
        result["plan_error"] = seed["plan_error"]
