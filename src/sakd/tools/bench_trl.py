"""`sakd bench` part (e): sakd's distillation step against TRL's GKD trainer step, fp32 on the CPU.

Both sides train the same random Llama student from the same random Llama teacher (one tokenizer, as GKD
requires) on the same batches, with the same divergence (forward KL = GKD's beta 0, or JSD at beta 0.5),
temperature 1, no cross-entropy term (GKD has none), off-policy (lmbda 0: no generation), and the same fused
AdamW settings, gradient clipping at 1 and cosine schedule. sakd runs without its EMA copy, which GKD lacks.
TRL runs two ways (`bench_trl_runners`): `GKDTrainer.training_step`, and `DistillationTrainer.compute_loss`,
its chunked loss that never holds the full logits, each followed by what `Trainer`'s loop does after it (clip,
optimizer and scheduler step, zero_grad). sakd is compared with TRL at its best: the faster of the two for
speed, the leaner for memory.

The tokenizer is a word-level one whose vocabulary is exactly the measured size, so that sakd compares
distributions over every logit as TRL does (sakd drops logit columns beyond the tokenizer's length), and the
corpus draws its words uniformly from that vocabulary.

Each (vocabulary, divergence, side) runs in a fresh process (`bench_loss.in_fresh_process`); its peak memory is
measured as part (a) measures it, the resident high-water mark (VmHWM, reset through /proc/self/clear_refs)
minus the resident size at the reset, here taken after the models are loaded and before the first step: what
training adds to the weights (gradients, AdamW state, activations, logits and the loss's tensors).
"""

from __future__ import annotations

import importlib.util
import json
import random
import statistics
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sakd.tools.bench_pairs import TrlSizes, word_tokenizer

if TYPE_CHECKING:
    from sakd.data.batch import Batch

DIVERGENCES = {"forward_kl": 0.0, "jsd": 0.5}  # sakd's name: GKD's beta
SIDES = ("sakd", "trl", "trl_chunked")  # TRL: GKDTrainer, and DistillationTrainer's chunked loss


def trl_version() -> str | None:
    """TRL's version, or None when it is not installed."""
    if importlib.util.find_spec("trl") is None:
        return None
    from importlib.metadata import version

    return version("trl")


def build_pair(root: Path, vocab: int, sizes: TrlSizes) -> dict[str, str]:
    """Tokenizer, corpus (random words, enough for every timed batch) and the two model folders."""
    import torch
    from transformers import AutoModelForCausalLM

    from sakd.models.tiny import dense_student_config

    root.mkdir(parents=True, exist_ok=True)
    tok = word_tokenizer(vocab)
    rng = random.Random(0)
    words = sizes.batch_size * sizes.max_length * (sizes.warmup_steps + sizes.steps + 2)
    corpus = root / "corpus.jsonl"
    with corpus.open("w") as f:
        for _ in range(0, words, 500):
            f.write(json.dumps({"text": " ".join(f"w{rng.randrange(vocab - 3)}" for _ in range(500))}) + "\n")
    paths = {"corpus": str(corpus)}
    positions = 2 * sizes.max_length
    for role, hidden in (("teacher", sizes.teacher_hidden), ("student", sizes.student_hidden)):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(
            dense_student_config(vocab, hidden, sizes.layers, max_length=positions)
        )
        folder = root / role
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
        paths[role] = str(folder)
    return paths


def _sakd_config(paths: dict[str, str], sizes: TrlSizes, divergence: str, out: Path, cross_vocab: str):
    from sakd.config import validate

    raw = {
        "teacher": {"model": paths["teacher"]},
        "student": {"model": paths["student"], "init": "pretrained"},
        "data": {"train": [paths["corpus"]], "max_length": sizes.max_length},
        "distill": {
            "divergence": divergence,
            "jsd_beta": DIVERGENCES["jsd"],
            "cross_vocab": cross_vocab,
            "chunk_likelihood_weight": 0.0,  # TRL's trainers have no such term: the same work on both sides
        },
        "curriculum": {"weights": {"kd": 1.0, "lm": 0.0}},
        "train": {"batch_size": sizes.batch_size, "progress": False, "ema_decay": None, "precision": "fp32"},
        "output_dir": str(out),
    }
    return validate(raw)


def _host_batches(cfg, tok, teacher_tok, sizes: TrlSizes) -> list[Batch]:
    from sakd.data.corpus import build_windows
    from sakd.tools.bench_step import pair_loader

    windows = build_windows(cfg.data.train, tok, tok, sizes.max_length)
    loader = pair_loader(windows, sizes.batch_size, tok, tok)
    return [loader.next_batch() for _ in range(sizes.warmup_steps + sizes.steps)]


def _sakd_runner(cfg, tok, batches: list[Batch]):
    from sakd.curriculum import curriculum_at
    from sakd.tools.bench_step import SakdStep, _prepared, _sakd_step
    from sakd.train.run import make_accelerator

    accelerator = make_accelerator("fp32", cpu=True)
    sakd = SakdStep(cfg, accelerator, "fp32", curriculum_at(0.0, cfg.curriculum))
    prepared = _prepared(batches, accelerator.device)
    return lambda i: _sakd_step(sakd.training, sakd.point, [prepared[i]]), sakd.training.student


def measure_side(spec: dict[str, Any]) -> dict[str, Any]:
    """One side's tokens/s and step peak memory (run in a fresh process); `spec` holds side, divergence,
    paths, sizes, out."""
    import torch
    from transformers.utils import logging as hf_logging

    from sakd.models.load import load_tokenizer
    from sakd.tools.bench_loss import MIB, _CpuPeak

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' deprecations inside TRL

    sizes = TrlSizes(**spec["sizes"])
    out = Path(spec["out"])
    cfg = _sakd_config(
        spec["paths"], sizes, spec["divergence"], out / "run", spec.get("cross_vocab", "projection")
    )
    tok = load_tokenizer(cfg.student.tokenizer_path, "student")
    teacher_tok = load_tokenizer(cfg.teacher.tokenizer_path, "teacher")
    batches = _host_batches(cfg, tok, teacher_tok, sizes)
    if spec["side"] == "sakd":
        step, student = _sakd_runner(cfg, tok, batches)
    else:
        from sakd.tools.bench_trl_runners import RUNNERS

        step, student = RUNNERS[spec["side"]](cfg, tok, batches, DIVERGENCES[spec["divergence"]], out / "trl")
    before = [p.detach().clone() for p in student.parameters()]
    # From before the first step: what training adds to the loaded models (gradients, AdamW state, a step's
    # activations and logits). A reset after warm-up would miss memory the allocator kept from the warm-up.
    peak = _CpuPeak()
    for i in range(sizes.warmup_steps):
        step(i)
    rates = []
    for i in range(sizes.warmup_steps, sizes.warmup_steps + sizes.steps):
        start = time.perf_counter()
        tokens = step(i)
        rates.append(tokens / (time.perf_counter() - start))
    result = {
        "tokens_per_s": statistics.median(rates),
        "step_tokens_per_s": [round(r, 1) for r in rates],
        "peak_mb": peak.peak() / MIB,
        "memory_method": peak.method,
        "threads": torch.get_num_threads(),
        # that the step did train: the student's weights moved
        "weights_changed": any(
            not torch.equal(a, b) for a, b in zip(before, student.parameters(), strict=True)
        ),
    }
    return result


def run_trl_bench(root: Path, sizes: TrlSizes, threads: int) -> dict[str, Any]:
    """Both sides at every vocabulary and divergence. Returns {trl_version, sizes, results: {vocab:
    {divergence: {sakd, trl, speed_ratio, memory_ratio}}}, ratios of the largest vocabulary and of 32k}."""
    from sakd.tools.bench_loss import in_fresh_process

    version = trl_version()
    if version is None:
        return {"trl_version": None, "note": "trl is not installed (pip install -e '.[bench]'): part skipped"}
    results: dict[str, Any] = {}
    for vocab in sizes.vocabs:
        paths = build_pair(root / f"v{vocab}", vocab, sizes)
        results[str(vocab)] = {}
        for divergence in DIVERGENCES:
            row: dict[str, Any] = {}
            for side in SIDES:
                spec = {
                    "side": side,
                    "divergence": divergence,
                    "paths": paths,
                    "sizes": asdict(sizes),
                    "out": str(root / f"v{vocab}" / f"{divergence}-{side}"),
                    "threads": threads,
                }
                row[side] = in_fresh_process("sakd.tools.bench_trl:measure_side", spec)
            results[str(vocab)][divergence] = {**row, **_ratios(row)}
    return {"trl_version": version, "sizes": asdict(sizes), "results": results}


def _ratios(row: dict[str, Any]) -> dict[str, Any]:
    """sakd against TRL at its best: the faster of its two steps for speed, the leaner for memory."""
    trl = [row[s] for s in SIDES[1:] if "error" not in row[s]]
    if "error" in row["sakd"] or not trl:
        return {"speed_ratio": None, "memory_ratio": None}
    fastest = max(trl, key=lambda r: r["tokens_per_s"])
    leanest = min(trl, key=lambda r: r["peak_mb"])
    return {
        "trl_fastest": SIDES[1 + [row[s] for s in SIDES[1:]].index(fastest)],
        "speed_ratio": row["sakd"]["tokens_per_s"] / fastest["tokens_per_s"],
        # a tiny step can stay within pages already resident: no ratio of nothing
        "memory_ratio": row["sakd"]["peak_mb"] / leanest["peak_mb"] if leanest["peak_mb"] > 0 else None,
    }


def headline(trl: dict[str, Any], vocab: int) -> tuple[float | None, float | None]:
    """(speed ratio, memory ratio) at `vocab`: the geometric mean over the divergences, None if unmeasured."""
    rows = list(trl.get("results", {}).get(str(vocab), {}).values())

    def mean(key: str) -> float | None:
        values = [r[key] for r in rows if r.get(key)]
        return statistics.geometric_mean(values) if rows and len(values) == len(rows) else None

    return mean("speed_ratio"), mean("memory_ratio")
