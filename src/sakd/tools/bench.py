"""`sakd bench` (also `python -m sakd.tools.bench`): how fast and how lean sakd's hot paths are, in one run.

(a) the chunked LM-head KD loss against the plain full-logits reference: time and peak memory per vocabulary
    (`sakd.tools.bench_loss`);
(b) a sakd distillation step against a minimal hand-written step, for one shared tokenizer and for two
    different tokenizers: tokens/s (`sakd.tools.bench_step`);
(c) the data pipeline (dual tokenization, alignment, packing, collation): tokens/s against the training rate;
(e) sakd's step against TRL's GKD trainer step, fp32 on the CPU, at two vocabularies (`sakd.tools.bench_trl`;
    skipped without trl);
(d) with --cache-epoch, one epoch of the demo's models trained live and from a teacher cache: the epoch
    speedup and both students' held-out bits per byte (`sakd.tools.cache_speed.demo_cache_epoch`).
The defaults fit a small CPU; the size flags scale it up on a GPU. `--quick` is a smaller run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from sakd.tools.bench_args import add_arguments
from sakd.tools.seed_scale import seed_scale_part

DEFAULTS: dict[str, Any] = {
    "tokens": 4096,
    "hidden": 64,
    "vocabs": [4096, 32768, 151936],
    "repeats": 3,
    "loss_budget_s": 30.0,
    "batch_size": 8,
    "max_length": 128,
    "teacher_hidden": 128,
    "teacher_layers": 2,
    "experts": 8,
    "student_hidden": 64,
    "student_layers": 2,
    "teacher_vocab": 4096,
    "student_vocab": 2048,
    "warmup_steps": 3,
    "steps": 10,
    "data_mb": 1.0,
    "cache_top_k": 64,
    "trl_vocabs": [32000, 151936],
    "trl_batch_size": 2,
    "trl_max_length": 128,
}
QUICK: dict[str, Any] = {
    "tokens": 512,
    "hidden": 32,
    "vocabs": [1024, 8192],
    "chunk_size": 128,
    "repeats": 2,
    "loss_budget_s": 5.0,
    "batch_size": 2,
    "max_length": 64,
    "teacher_hidden": 48,
    "teacher_layers": 2,
    "experts": 4,
    "student_hidden": 32,
    "student_layers": 2,
    "teacher_vocab": 512,
    "student_vocab": 384,
    "warmup_steps": 2,
    "steps": 3,
    "data_mb": 0.1,
    "cache_top_k": 16,
    "trl_vocabs": [256, 512],
    "trl_batch_size": 2,
    "trl_max_length": 32,
}
# JSON key: (comparison, bound)
TARGETS = {
    "loss_memory_ratio": ("<=", 0.25),
    "loss_time_ratio": ("<=", 1.2),
    "step_speed_ratio_same_vocab": (">=", 0.9),
    "step_speed_ratio_cross_vocab": (">=", 0.8),
    "data_to_train_ratio": (">=", 10.0),
    "cache_speedup": (">=", 2.0),
    "cache_epoch_speedup": (">=", 2.0),
    "cache_epoch_bpb_difference": ("abs<=", 0.01),
    "cache_efficiency": (">=", 0.9),
    "vs_trl_speed_ratio": (">=", 2.0),
    "vs_trl_memory_ratio": ("<=", 0.35),
    "vs_trl_speed_ratio_32k": (">=", 1.3),
    "vs_trl_memory_ratio_32k": ("<=", 0.7),
    "plan_error": ("abs<=", 0.2),
}


def resolve(args: argparse.Namespace) -> dict[str, Any]:
    """The sizes of this run: the flags given, else the --quick or default sizes; checked."""
    from sakd.errors import UserError

    preset = {**DEFAULTS, **(QUICK if args.quick else {})}
    names = [*DEFAULTS, "chunk_size", "chunk_logits"]
    sizes = {
        name: getattr(args, name) if getattr(args, name) is not None else preset.get(name) for name in names
    }
    bad = [
        f"--{name.replace('_', '-')} {value}"
        for name, value in sizes.items()
        if value is not None and any(v <= 0 for v in (value if isinstance(value, list) else [value]))
    ]
    if not 0.0 <= args.progress <= 1.0:
        bad.append(f"--progress {args.progress}")
    if args.threads is not None and args.threads < 0:
        bad.append(f"--threads {args.threads}")
    if args.epoch_repeats < 1:
        bad.append(f"--epoch-repeats {args.epoch_repeats}")
    if bad:
        raise UserError(f"{', '.join(bad)}: sizes must be positive and --progress in [0, 1]")
    return sizes


def _device_info(device) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "type": device.type,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        info["name"] = torch.cuda.get_device_name(device)
        info["memory_gib"] = round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)
    else:
        info["name"] = _cpu_name()
    return info


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _load() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from transformers.utils import logging as hf_logging

    from sakd.config import apply_overrides
    from sakd.models.load import resolve_precision
    from sakd.tools.bench_step import StepSizes, bench_config

    hf_logging.disable_progress_bar()
    o = resolve(args)
    if args.device == "cuda" and not torch.cuda.is_available():
        from sakd.errors import UserError

        raise UserError("--device cuda but torch sees no CUDA device: use --device cpu or auto")
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    own_threads = torch.get_num_threads()
    threads = args.threads if args.threads is not None else (1 if device.type == "cpu" else 0)
    if threads:
        torch.set_num_threads(threads)
    precision = resolve_precision(args.precision, device)

    def overrides(raw: dict[str, Any]) -> dict[str, Any]:
        return apply_overrides(raw, list(args.set))

    started = time.perf_counter()
    info = _device_info(device)
    result: dict[str, Any] = {"device": f"{device.type}: {info['name']}", "device_info": info}
    result["load_average_start"] = _load()
    part_s: dict[str, float] = {}

    def lap(name: str) -> None:
        part_s[name] = round(time.perf_counter() - started - sum(part_s.values()), 1)

    sizes = StepSizes(**{k: o[k] for k in StepSizes.__dataclass_fields__})
    with tempfile.TemporaryDirectory(prefix="sakd-bench-") as tmp:
        root = Path(tmp)
        # The run config's chunking (with --set) unless given: the same chunking as in part (b).
        distill = bench_config(root, root, root, sizes, overrides, root, False).distill
        if o["chunk_size"] is None:
            o["chunk_size"] = distill.chunk_size
        if o["chunk_logits"] is None:
            o["chunk_logits"] = distill.chunk_logits_on(device.type)
        result["settings"] = {**o, "precision": precision, "progress": args.progress, "overrides": args.set}
        _loss_part(result, o, device)
        lap("loss")
        _step_and_data_parts(result, o, sizes, root, device, precision, overrides, args.progress)
        lap("step_and_data")
        _trl_part(result, o, root / "trl", args.no_trl, device)
        lap("trl")
        seed_scale_part(result, args, Path(args.workdir) / "seed-scale", device, precision)
        lap("seed_scale")
    result["cache_epoch_speedup"] = result["cache_epoch_bpb_difference"] = None
    if args.cache_epoch:
        from sakd.tools.cache_speed import demo_cache_epoch

        print(f"(d) one epoch of the {args.cache_epoch} demo, live and cached ...", file=sys.stderr)
        torch.set_num_threads(own_threads)  # as `sakd train` runs
        epoch = demo_cache_epoch(
            args.workdir, args.cache_epoch == "quick", args.epoch_repeats, o["cache_top_k"]
        )
        result["cache_epoch"] = epoch
        result["cache_epoch_speedup"] = epoch["speedup"]
        result["cache_epoch_bpb_difference"] = epoch["bpb_relative_difference"]
        lap("epoch")
    result["part_s"] = part_s
    result["targets"] = {
        name: {
            "target": f"{op} {bound}",
            "met": None if result.get(name) is None else _meets(result[name], op, bound),
        }
        for name, (op, bound) in TARGETS.items()
    }
    result["load_average_end"] = _load()
    result["total_s"] = round(time.perf_counter() - started, 1)
    return result


def _loss_part(result: dict[str, Any], o: dict[str, Any], device) -> None:
    """Part (a): the chunked against the full-logits KD loss."""
    from sakd.tools.bench_loss import loss_ratios, run_loss_bench

    print(
        f"(a) KD loss, chunked vs full logits, {o['tokens']} tokens, vocabularies {o['vocabs']} ...",
        file=sys.stderr,
    )
    loss = run_loss_bench(
        o["tokens"],
        o["hidden"],
        o["vocabs"],
        o["chunk_size"],
        o["repeats"],
        o["loss_budget_s"],
        device,
        o["chunk_logits"],
    )
    ratios = loss_ratios(loss["results"])
    loss["ratios"] = {str(v): r for v, r in ratios.items()}
    result["loss"] = loss
    largest = max(ratios)
    result["loss_ratio_vocab"] = largest
    result["loss_memory_ratio"] = ratios[largest]["memory_ratio"]
    result["loss_time_ratio"] = ratios[largest]["time_ratio"]
    unmeasured = [r for r in loss["results"] if r["vocab"] == largest and r["status"] != "ok"]
    if unmeasured:
        result["loss_note"] = "; ".join(f"{r['variant']} {r['status']}: {r['note']}" for r in unmeasured)


def _step_and_data_parts(
    result: dict[str, Any], o: dict[str, Any], sizes, root: Path, device, precision, overrides, progress
) -> None:
    """Parts (b) and (c): the sakd step against the reference and the cached step; the data pipeline."""
    from sakd.tools.bench_data import run_data_bench
    from sakd.tools.bench_step import build_assets, run_step_bench
    from sakd.train.run import make_accelerator

    print("(b) training steps, sakd vs reference ...", file=sys.stderr)
    assets = build_assets(root, sizes)
    accelerator = make_accelerator(precision, cpu=device.type == "cpu")
    step = run_step_bench(
        assets, sizes, progress, overrides, accelerator, precision, root / "runs", o["cache_top_k"]
    )
    result["step"] = step
    result["step_speed_ratio_same_vocab"] = step["same_vocab"]["ratio"]
    result["step_speed_ratio_cross_vocab"] = step["cross_vocab"]["ratio"]
    cross = step["cross_vocab"]
    result["cache_speedup"] = cross["cache_speedup"]
    result["cache_ideal_speedup"] = cross["cache_ideal_speedup"]
    result["cache_efficiency"] = cross.get("cache_efficiency")

    print("(c) data loading ...", file=sys.stderr)
    data = run_data_bench(assets, sizes)
    data["train_tokens_per_s"] = cross["sakd"]["tokens_per_s"]
    result["data"] = data
    result["data_to_train_ratio"] = data["tokens_per_s"] / data["train_tokens_per_s"]


def _trl_part(result: dict[str, Any], o: dict[str, Any], root: Path, skip: bool, device) -> None:
    """Part (e): against TRL's GKD and chunked distillation steps, and across tokenizers its GOLD step; the
    vs_trl keys stay None when skipped."""
    import torch

    from sakd.tools.bench_gold import run_gold_bench
    from sakd.tools.bench_pairs import TrlSizes
    from sakd.tools.bench_trl import headline, run_trl_bench, trl_version

    keys = (
        "vs_trl_speed_ratio",
        "vs_trl_memory_ratio",
        "vs_trl_speed_ratio_32k",
        "vs_trl_memory_ratio_32k",
        "vs_trl_gold_speed_ratio",
    )
    result.update(dict.fromkeys(keys), trl_version=trl_version())
    if skip or result["trl_version"] is None or device.type != "cpu":
        why = (
            "--no-trl"
            if skip
            else "it runs on the CPU only"
            if result["trl_version"]
            else "trl is not installed"
        )
        print(f"(e) against TRL: skipped ({why}; pip install -e '.[bench]' installs trl)", file=sys.stderr)
        result["trl"] = {"skipped": why}
        return
    print(f"(e) sakd vs TRL's steps, vocabularies {o['trl_vocabs']} ...", file=sys.stderr)
    sizes = TrlSizes(
        vocabs=tuple(sorted(o["trl_vocabs"])),
        batch_size=o["trl_batch_size"],
        max_length=o["trl_max_length"],
        teacher_hidden=o["teacher_hidden"],
        student_hidden=o["student_hidden"],
        layers=o["student_layers"],
        warmup_steps=o["warmup_steps"],
        steps=o["steps"],
    )
    trl = run_trl_bench(root, sizes, torch.get_num_threads())
    # GOLD across tokenizers: a teacher of the smallest vocabulary, a student tokenizer a quarter of it
    teacher_vocab = min(sizes.vocabs)
    trl["gold"] = run_gold_bench(
        root / "gold", sizes, teacher_vocab, teacher_vocab // 4, torch.get_num_threads()
    )
    result["vs_trl_gold_speed_ratio"] = trl["gold"]["speed_ratio"]
    result["trl"] = trl
    result["vs_trl_speed_ratio"], result["vs_trl_memory_ratio"] = headline(trl, max(sizes.vocabs))
    result["vs_trl_speed_ratio_32k"], result["vs_trl_memory_ratio_32k"] = headline(trl, min(sizes.vocabs))


def _meets(value: float, op: str, bound: float) -> bool:
    if op == "abs<=":
        return abs(value) <= bound
    return value <= bound if op == "<=" else value >= bound


def main_from_args(args: argparse.Namespace) -> int:
    import torch

    threads = torch.get_num_threads()
    try:
        result = run_bench(args)
    finally:  # the bench may pin torch to one thread: leave the caller's setting as it was
        torch.set_num_threads(threads)
    from sakd.tools.bench_table import render, render_extra

    render(result)
    render_extra(result)
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=1) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    from sakd.errors import UserError

    parser = argparse.ArgumentParser(prog="python -m sakd.tools.bench", description=__doc__.splitlines()[0])
    add_arguments(parser)
    try:
        return main_from_args(parser.parse_args(argv))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
