"""`sakd bench` (also `python -m sakd.tools.bench`): how fast and how lean sakd's hot paths are, in one run.

(a) the chunked LM-head KD loss against the plain full-logits reference: time and peak memory per vocabulary
    (`sakd.tools.bench_loss`);
(b) a sakd distillation step against a minimal hand-written step, for one shared tokenizer and for two
    different tokenizers: tokens/s (`sakd.tools.bench_step`);
(c) the data pipeline (dual tokenization, alignment, packing, collation): tokens/s against the training rate;
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
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The bench flags (shared by `sakd bench` and `python -m sakd.tools.bench`); unset sizes take the defaults,
    or the --quick sizes."""
    p.add_argument("--quick", action="store_true", help="a small run (about a minute on 2 CPU cores)")
    p.add_argument("--output", metavar="FILE.json", help="also write every number to this JSON file")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16", "fp16"],
        default="auto",
        help="training precision of part (b), as train.precision (auto: fp32 on CPU)",
    )
    p.add_argument(
        "--threads",
        type=int,
        help="torch CPU threads (default on CPU: 1, so that sakd and reference are compared op for op even "
        "on a busy shared machine, where each op of several threads can wait for a descheduled one; 0: "
        "torch's own choice, as training uses)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override the sakd run config of part (b), e.g. --set curriculum.weights.attention=0",
    )
    g = p.add_argument_group("(a) KD loss")
    g.add_argument("--tokens", type=int, help="rows of the loss (default 4096)")
    g.add_argument("--hidden", type=int, help="hidden size of student and teacher (default 64)")
    g.add_argument(
        "--vocabs",
        type=lambda s: [int(v) for v in s.split(",")],
        help="comma-separated vocabulary sizes (default 4096,32768,151936)",
    )
    g.add_argument(
        "--chunk-size", type=int, help="rows per chunk (default: distill.chunk_size of the config)"
    )
    g.add_argument(
        "--chunk-logits",
        type=int,
        help="at most rows x vocabulary logits per chunk (default: distill.chunk_logits of the config)",
    )
    g.add_argument("--repeats", type=int, help="timed passes per variant after a warm-up (default 3)")
    g.add_argument(
        "--loss-budget-s",
        type=float,
        help="stop repeating a variant once this many seconds are spent (default 30)",
    )
    g = p.add_argument_group("(b) training step and (c) data")
    g.add_argument("--batch-size", type=int, help="windows per batch (default 8)")
    g.add_argument("--max-length", type=int, help="tokens per window (default 128)")
    g.add_argument("--teacher-hidden", type=int, help="MoE teacher hidden size (default 128)")
    g.add_argument("--teacher-layers", type=int, help="(default 2)")
    g.add_argument("--experts", type=int, help="teacher experts per MoE layer (default 8)")
    g.add_argument("--student-hidden", type=int, help="dense student hidden size (default 64)")
    g.add_argument("--student-layers", type=int, help="(default 2)")
    g.add_argument(
        "--teacher-vocab", type=int, help="tokenizer A size, teacher (and same-vocab student) (4096)"
    )
    g.add_argument("--student-vocab", type=int, help="tokenizer B size, cross-vocab student (2048)")
    g.add_argument("--warmup-steps", type=int, help="untimed steps per variant (default 3)")
    g.add_argument("--steps", type=int, help="timed steps per variant, alternating sakd and reference (10)")
    g.add_argument("--data-mb", type=float, help="MB of standard-library text for tokenizers and data (1.0)")
    g.add_argument(
        "--cache-top-k", type=int, help="teacher distributions kept per position by the cached step (64)"
    )
    g.add_argument(
        "--progress",
        type=float,
        default=0.0,
        help="training progress whose curriculum point the sakd step uses (0: phase 1, KD + LM)",
    )
    g = p.add_argument_group("(d) a whole epoch from the teacher cache")
    g.add_argument(
        "--cache-epoch",
        choices=["quick", "full"],
        help="also train one epoch of the quick or full demo's models live and from a teacher cache, with "
        "torch's own threads (quick: about 3 minutes on 2 CPU cores, once the demo teacher exists)",
    )
    g.add_argument(
        "--workdir",
        default="demo-runs",
        help="the demo's corpus and pretrained teacher (shared with `sakd demo`)",
    )
    g.add_argument("--epoch-repeats", type=int, default=1, help="live and cached epochs each, alternating")


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
    from accelerate import Accelerator
    from transformers.utils import logging as hf_logging

    from sakd.config import apply_overrides
    from sakd.models.load import resolve_precision
    from sakd.tools.bench_loss import loss_ratios, run_loss_bench
    from sakd.tools.bench_step import StepSizes, bench_config, build_assets, run_data_bench, run_step_bench

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
    sizes = StepSizes(**{k: o[k] for k in StepSizes.__dataclass_fields__})
    with tempfile.TemporaryDirectory(prefix="sakd-bench-") as tmp:
        root = Path(tmp)
        # The run config's chunking (with --set) unless given: the same chunking as in part (b).
        distill = bench_config(root, root, root, sizes, overrides, root, False).distill
        for key in ("chunk_size", "chunk_logits"):
            if o[key] is None:
                o[key] = getattr(distill, key)
        result["settings"] = {**o, "precision": precision, "progress": args.progress, "overrides": args.set}

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
        part_s = {"loss": round(time.perf_counter() - started, 1)}
        largest = max(ratios)
        result["loss_ratio_vocab"] = largest
        result["loss_memory_ratio"] = ratios[largest]["memory_ratio"]
        result["loss_time_ratio"] = ratios[largest]["time_ratio"]
        unmeasured = [r for r in loss["results"] if r["vocab"] == largest and r["status"] != "ok"]
        if unmeasured:
            result["loss_note"] = "; ".join(f"{r['variant']} {r['status']}: {r['note']}" for r in unmeasured)

        print("(b) training steps, sakd vs reference ...", file=sys.stderr)
        assets = build_assets(root, sizes)
        accelerator = Accelerator(
            cpu=device.type == "cpu", mixed_precision="no" if precision == "fp32" else precision
        )
        step = run_step_bench(
            assets, sizes, args.progress, overrides, accelerator, precision, root / "runs", o["cache_top_k"]
        )
        result["step"] = step
        part_s["step"] = round(time.perf_counter() - started - sum(part_s.values()), 1)
        result["step_speed_ratio_same_vocab"] = step["same_vocab"]["ratio"]
        result["step_speed_ratio_cross_vocab"] = step["cross_vocab"]["ratio"]
        result["cache_speedup"] = step["cross_vocab"]["cache_speedup"]

        print("(c) data loading ...", file=sys.stderr)
        data = run_data_bench(assets, sizes)
        data["train_tokens_per_s"] = step["cross_vocab"]["sakd"]["tokens_per_s"]
        result["data"] = data
        part_s["data"] = round(time.perf_counter() - started - sum(part_s.values()), 1)
        result["data_to_train_ratio"] = data["tokens_per_s"] / data["train_tokens_per_s"]
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
        part_s["epoch"] = round(time.perf_counter() - started - sum(part_s.values()), 1)
    result["part_s"] = part_s
    result["targets"] = {
        name: {
            "target": f"{op} {bound}",
            "met": None if result[name] is None else _meets(result[name], op, bound),
        }
        for name, (op, bound) in TARGETS.items()
    }
    result["load_average_end"] = _load()
    result["total_s"] = round(time.perf_counter() - started, 1)
    return result


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
    from sakd.tools.bench_table import render

    render(result)
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
