"""`sakd bench` part (b): a sakd distillation step against a hand-written reference step, and against itself
reading a teacher cache.

The sakd step is the optimizer step of `sakd.train.loop.train` built from the same pieces (config defaults,
`DistillObjective`, heads, AdamW groups, scheduler, Accelerate, EMA) and run at one fixed curriculum point.
The reference step is what a user would write by hand: the teacher's forward under no_grad returning full
logits, the student's full logits, forward KL over the full vocabulary + cross-entropy, fused AdamW (as
sakd's). Both train the same student weights on the same batches, alternating step by step so that load from
other processes hits both.
A hand-written cross-tokenizer reference does not exist: for the cross-tokenizer pair the reference is the
same-tokenizer reference step with the student's tokenizer (a teacher of the same architecture with the
student's vocabulary), counted in student tokens like the sakd step.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from transformers import AutoModelForCausalLM

from sakd.cache.capture import capture_teacher_cache
from sakd.cache.training import open_training_cache
from sakd.config import Config
from sakd.curriculum import CurriculumPoint, curriculum_at
from sakd.data.corpus import build_windows
from sakd.data.loader import WindowLoader
from sakd.data.tokenize import input_format
from sakd.errors import UserError
from sakd.models.load import load_tokenizer
from sakd.models.tiny import dense_student_config, moe_teacher_config, train_tokenizer
from sakd.tools.bench_reference import ReferenceStep
from sakd.tools.cache_speed import TeacherTimer, cache_efficiency
from sakd.tools.demo import stdlib_files
from sakd.train.step import build_training, prepare_batch, step_batches, to_device, train_step

MAX_STEP_BATCHES = 16


@dataclass(frozen=True)
class StepSizes:
    batch_size: int
    max_length: int
    teacher_hidden: int
    teacher_layers: int
    experts: int
    student_hidden: int
    student_layers: int
    teacher_vocab: int
    student_vocab: int
    warmup_steps: int
    steps: int
    data_mb: float


def stdlib_texts(megabytes: float) -> list[str]:
    """The standard library's own sources, in sorted order, up to `megabytes` of text."""
    texts, size = [], 0
    for file in stdlib_files():
        if size >= megabytes * 1e6:
            break
        try:
            text = file.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip():
            texts.append(text)
            size += len(text)
    return texts


def write_jsonl(path: Path, texts: list[str]) -> Path:
    with path.open("w") as f:
        for text in texts:
            f.write(json.dumps({"text": text}) + "\n")
    return path


def build_assets(root: Path, sizes: StepSizes) -> dict[str, Path]:
    """Corpus, two tokenizers that split text differently, and four model folders: an MoE teacher and a
    dense student for each tokenizer (`teacher_a`, `student_a` share tokenizer A; `_b` tokenizer B)."""
    texts = stdlib_texts(sizes.data_mb)
    # The timed steps cycle through at most MAX_STEP_BATCHES batches: their windows come from the first
    # documents only (the loader wraps around if they are too few), so that set-up does not tokenize it all.
    step_chars = MAX_STEP_BATCHES * sizes.batch_size * sizes.max_length * 8
    step_texts: list[str] = []
    for text in texts:
        step_texts.append(text)
        if sum(map(len, step_texts)) >= step_chars:
            break
    tokenizers = {
        "a": train_tokenizer(texts, sizes.teacher_vocab, split="gpt2"),
        "b": train_tokenizer(texts, sizes.student_vocab, split="isolated"),
    }
    positions = 2 * sizes.max_length
    paths = {
        "corpus": write_jsonl(root / "corpus.jsonl", texts),
        "step_corpus": write_jsonl(root / "step_corpus.jsonl", step_texts),
    }
    for side, tok in tokenizers.items():
        configs = {
            "teacher": moe_teacher_config(
                len(tok),
                sizes.teacher_hidden,
                sizes.teacher_layers,
                experts=sizes.experts,
                max_length=positions,
            ),
            "student": dense_student_config(
                len(tok), sizes.student_hidden, sizes.student_layers, max_length=positions
            ),
        }
        for role, cfg in configs.items():
            folder = root / f"{role}_{side}"
            torch.manual_seed(0)
            AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
            tok.save_pretrained(folder)
            paths[f"{role}_{side}"] = folder
    return paths


def bench_config(
    teacher: Path,
    student: Path,
    corpus: Path,
    sizes: StepSizes,
    raw_overrides,
    out: Path,
    check_files: bool = True,
) -> Config:
    """The run config train() would get for these models and data; `raw_overrides(raw)` applies --set."""
    from sakd.config import validate

    raw = {
        "teacher": {"model": str(teacher)},
        "student": {"model": str(student), "init": "pretrained"},
        "data": {"train": [str(corpus)], "max_length": sizes.max_length},
        "train": {"batch_size": sizes.batch_size, "progress": False},
        # the hand-written reference computes plain KD on every row, so the step it is compared with does
        # too, and so does the cached step (a cache keeps every row it captured)
        "distill": {"chunk_likelihood_weight": 0.0, "projection_rows": "all"},
        "output_dir": str(out),
    }
    return validate(raw_overrides(raw), check_files)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class SakdStep:
    """The set-up and the optimizer step of `train()` (`build_training` / `train_step`), without logging,
    evaluation and checkpoints, at one fixed curriculum point."""

    def __init__(self, cfg: Config, accelerator: Accelerator, precision: str, point: CurriculumPoint):
        self.cfg, self.precision, self.point = cfg, precision, point
        set_seed(cfg.train.seed)
        self.student_tok = load_tokenizer(cfg.student.tokenizer_path, "student")
        self.teacher_tok = load_tokenizer(cfg.teacher.tokenizer_path, "teacher")
        self.training = build_training(cfg, accelerator, precision, self.student_tok, self.teacher_tok)
        self.teacher = self.training.teacher

    def describe(self) -> dict[str, Any]:
        t = self.training
        return {
            "objective": t.objective.kind,
            "attention": t.attention,
            "heads": t.heads is not None,
            "ema": t.ema is not None,
            "phase": self.point.phase,
            "active_losses": sorted(k for k, v in self.point.weights.items() if v > 0),
        }

    def step(self, batches: list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]]) -> int:
        """One optimizer step over `grad_accum` micro-batches, each (host batch, `prepare_batch` of it) as the
        loop has them; returns the student tokens it saw."""
        return _sakd_step(self.training, self.point, batches)


def _batches(corpus: Path, student_tok, teacher_tok, sizes: StepSizes, count: int) -> tuple[list, list[dict]]:
    """The windows of `corpus` and `count` batches of them (on the CPU; the loader wraps around)."""
    windows = build_windows([corpus], student_tok, teacher_tok, sizes.max_length)
    if len(windows) < sizes.batch_size:
        raise UserError(
            f"the benchmark corpus gives {len(windows)} windows, fewer than one batch of {sizes.batch_size}: "
            "raise --data-mb or lower --batch-size / --max-length"
        )
    loader = pair_loader(windows, sizes.batch_size, student_tok, teacher_tok)
    return windows, [loader.next_batch() for _ in range(count)]


def pair_loader(windows, batch_size: int, student_tok, teacher_tok, drop_last: bool = True) -> WindowLoader:
    """The training loader over `windows` for a tokenizer pair, shuffled with seed 0 as every bench run."""
    return WindowLoader(
        windows,
        batch_size,
        seed=0,
        student=input_format(student_tok),
        teacher=input_format(teacher_tok),
        drop_last=drop_last,
    )


class CachedStep:
    """The sakd step with the teacher cache: the teacher is run once over the step corpus by
    `capture_teacher_cache` (not timed), then training reads its top-k rows and loads no teacher."""

    def __init__(self, live: SakdStep, corpus: Path, windows, batches, top_k: int, root: Path):
        """`live`: the same config's live step (its config, precision, accelerator, tokenizers and curriculum
        point are reused)."""
        cfg, accelerator, precision = live.cfg, live.training.accelerator, live.precision
        self.point = live.point
        set_seed(cfg.train.seed)
        student_tok, teacher_tok = live.student_tok, live.teacher_tok
        capture_cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"train": [str(corpus)]})})
        self.capture = capture_teacher_cache(
            capture_cfg, top_k=top_k, path=root, device=str(accelerator.device), progress=False
        )
        cached = open_training_cache(
            root, windows, [str(corpus)], cfg.data.max_length, cfg.teacher.model, student_tok, teacher_tok
        )
        self.coverage = cached.coverage["coverage"]
        # a cache has no per-token log-probabilities: the cached step runs without the chunk-likelihood term
        cfg = cfg.model_copy(
            update={"distill": cfg.distill.model_copy(update={"chunk_likelihood_weight": 0.0})}
        )
        self.training = build_training(cfg, accelerator, precision, student_tok, teacher_tok, cached)
        self.batches = _prepared([cached.attach(b) for b in batches], accelerator.device)

    def step(self, batches: list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]]) -> int:
        return _sakd_step(self.training, self.point, batches)


def _prepared(host_batches: list[dict], device: torch.device) -> list[tuple[dict, dict]]:
    return [(b, prepare_batch(b, device)) for b in host_batches]


def _sakd_step(training, point, batches: list[tuple[dict, dict]]) -> int:
    step = step_batches([h for h, _ in batches], training.accelerator, [d for _, d in batches])
    train_step(training, step, point)
    return step.tokens


def _rates(
    runners: dict[str, tuple[Callable[[list[dict]], int], list[dict]]],
    sizes: StepSizes,
    grad_accum: int,
    device: torch.device,
) -> dict[str, dict[str, Any]]:
    """Warm-up steps, then `steps` timed steps per runner, alternating runner by runner (the first runner
    alternating too), so that a burst of load from other processes falls on both; tokens/s is the median of
    the per-step rates."""
    position = dict.fromkeys(runners, 0)

    def step(name: str) -> int:
        run, batches = runners[name]
        i = position[name]
        position[name] += grad_accum
        return run([batches[(i + k) % len(batches)] for k in range(grad_accum)])

    for name in runners:
        for _ in range(sizes.warmup_steps):
            step(name)
    _sync(device)
    rates: dict[str, list[float]] = {name: [] for name in runners}
    seconds: dict[str, list[float]] = {name: [] for name in runners}
    names = list(runners)
    for i in range(sizes.steps):
        for name in names if i % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            tokens = step(name)
            _sync(device)
            seconds[name].append(time.perf_counter() - start)
            rates[name].append(tokens / seconds[name][-1])
    return {
        name: {
            "tokens_per_s": statistics.median(values),
            "step_tokens_per_s": [round(v, 1) for v in values],
            "step_s": seconds[name],
        }
        for name, values in rates.items()
    }


def _parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _pair_result(rates, sakd: SakdStep, cached: CachedStep, ref_tok, cpu_batches) -> dict[str, Any]:
    return {
        **rates,
        "ratio": rates["sakd"]["tokens_per_s"] / rates["reference"]["tokens_per_s"],
        "cache_speedup": rates["sakd_cached"]["tokens_per_s"] / rates["sakd"]["tokens_per_s"],
        "cache": {
            "top_k": cached.capture["top_k"],
            "coverage": cached.coverage,
            "capture_s": round(cached.capture["seconds"], 2),
        },
        "teacher_to_student_parameters": _parameters(sakd.teacher) / _parameters(sakd.training.student),
        "sakd_setup": sakd.describe(),
        "teacher_vocab": len(sakd.teacher_tok),
        "student_vocab": len(sakd.student_tok),
        "reference_vocab": len(ref_tok),
        "tokens_per_batch": round(statistics.mean(int(b.student.attention_mask.sum()) for b in cpu_batches)),
    }


def run_step_bench(
    assets: dict[str, Path],
    sizes: StepSizes,
    progress: float,
    raw_overrides,
    accelerator: Accelerator,
    precision: str,
    out: Path,
    cache_top_k: int = 64,
) -> dict[str, Any]:
    """Tokens/s of the sakd step, of the reference step and of the sakd step reading the teacher cache, for
    one shared tokenizer and for two."""
    device = accelerator.device
    results: dict[str, Any] = {}
    pairs = {
        # name: (sakd teacher, sakd student, reference teacher, reference student)
        "same_vocab": ("teacher_a", "student_a", "teacher_a", "student_a"),
        "cross_vocab": ("teacher_a", "student_b", "teacher_b", "student_b"),
    }
    for name, (t_sakd, s_sakd, t_ref, s_ref) in pairs.items():
        cfg = bench_config(assets[t_sakd], assets[s_sakd], assets["corpus"], sizes, raw_overrides, out / name)
        point = curriculum_at(progress, cfg.curriculum)
        sakd = SakdStep(cfg, accelerator, precision, point)
        teacher_dtype = next(sakd.teacher.parameters()).dtype
        reference = ReferenceStep(assets[t_ref], assets[s_ref], cfg, teacher_dtype, accelerator, point)
        ref_tok = load_tokenizer(str(assets[s_ref]), "student")
        count = min(MAX_STEP_BATCHES, sizes.warmup_steps + sizes.steps) * cfg.train.grad_accum
        windows, cpu_batches = _batches(
            assets["step_corpus"], sakd.student_tok, sakd.teacher_tok, sizes, count
        )
        sakd_batches = _prepared(cpu_batches, device)
        ref_batches = [
            to_device(b, device) for b in _batches(assets["step_corpus"], ref_tok, ref_tok, sizes, count)[1]
        ]
        cached = CachedStep(
            sakd, assets["step_corpus"], windows, cpu_batches, cache_top_k, out / f"{name}-teacher-cache"
        )
        timer = TeacherTimer(sakd.teacher, device)  # the live step's teacher forward, timed on its own
        rates = _rates(
            {
                "sakd": (sakd.step, sakd_batches),
                "reference": (reference.step, ref_batches),
                "sakd_cached": (cached.step, cached.batches),
            },
            sizes,
            cfg.train.grad_accum,
            device,
        )
        timer.close()
        efficiency = cache_efficiency(rates, timer.per_step(sizes.steps, cfg.train.grad_accum))
        results[name] = {**efficiency, **_pair_result(rates, sakd, cached, ref_tok, cpu_batches)}
        del sakd, reference, cached
    results["cross_vocab"]["reference_note"] = (
        "no hand-written cross-tokenizer reference exists: the reference is the same-tokenizer reference "
        "step with the student's tokenizer (teacher of the same architecture, student vocabulary), in "
        "student tokens"
    )
    return results
