"""The `sakd` command line: train, eval, generate, report, demo. A user's mistake prints one `error:` line and exits with 2."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from sakd.errors import UserError

# Below this mean teacher mass inside the cached top-k, `cache-teacher` suggests a larger --top-k.
LOW_TOP_K_MASS = 0.8


def _train(args: argparse.Namespace) -> int:
    from accelerate import PartialState

    from sakd.config import load_config
    from sakd.train.loop import train

    cfg = load_config(args.config, args.set)
    summary = train(cfg, resume=args.resume, force=args.force)
    if not PartialState().is_main_process:
        return 0
    final = summary["final"]
    bpb = (
        f", held-out bits per byte {final['bits_per_byte']:.4f}" if final["bits_per_byte"] is not None else ""
    )
    print(
        f"done: {summary['step']} steps ({summary['stop_reason']}), {summary['skipped_steps']} skipped; "
        f"student saved to {os.path.join(cfg.output_dir, 'final')} ({final['weights']} weights{bpb})"
    )
    return 0


def _eval(args: argparse.Namespace) -> int:
    from sakd.eval.run import EvalData, run_eval

    result = run_eval(
        args.student,
        args.teacher,
        EvalData(args.data, args.max_length, args.batch_size, args.max_windows),
        args.output,
        device=args.device,
        top_k=args.top_k,
        gen_new_tokens=args.gen_new_tokens,
    )
    if args.format == "json":
        print(json.dumps(result, indent=1))
    else:
        from sakd.eval.run import print_table

        print_table(result)
    return 0


def _generate(args: argparse.Namespace) -> int:
    from sakd.generate import run_generate

    print(
        run_generate(
            args.model, args.prompt, args.max_new_tokens, args.temperature, args.seed, args.device, args.chat
        )
    )
    return 0


def _report(args: argparse.Namespace) -> int:
    from sakd.report.build import build_report

    paths = build_report(args.run_dir)
    print(f"report: {paths['markdown']} and {paths['html']}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from sakd.tools.demo import run_demo

    run_demo(args.workdir, quick=args.quick)
    return 0


def _ablate(args: argparse.Namespace) -> int:
    from sakd.tools.ablate import run_ablation, variant_names

    unknown = [v for v in args.variant if v not in variant_names()]
    if unknown:
        raise UserError(f"unknown variant(s) {unknown}: choose from {variant_names()}")
    if args.seeds < 1:
        raise UserError(f"--seeds must be at least 1, got {args.seeds}")
    run_ablation(args.workdir, quick=args.quick, variants=args.variant or None, seeds=args.seeds)
    return 0


def _cache_teacher(args: argparse.Namespace) -> int:
    from sakd.cache import capture_teacher_cache
    from sakd.config import load_config

    cfg = load_config(args.config, args.set)
    result = capture_teacher_cache(
        cfg,
        top_k=args.top_k,
        batch_size=args.batch_size,
        shard_windows=args.shard_windows,
        probs_dtype=args.probs_dtype,
        device=args.device,
        progress=cfg.train.progress,
    )
    print(
        f"teacher cache {result['path']}: {result['shards']} of {result['num_shards']} shards, {result['rows']} "
        f"positions of {result['windows']} windows, top-{result['top_k']} ({result['seconds']:.0f} s); "
        f"train from it with --set teacher.cache={result['path']}"
    )
    kept = result["top_k_mass"]
    if kept is not None:
        print(
            f"the top-{result['top_k']} holds {100 * kept:.1f}% of the teacher's probability on average; the rest "
            f"trains as one tail bucket"
            + (" (a larger --top-k keeps more of the teacher)" if kept < LOW_TOP_K_MASS else "")
        )
    return 0


def _plan(args: argparse.Namespace) -> int:
    from sakd.config import apply_overrides, read_yaml, validate
    from sakd.tools.plan import format_plan, parse_size
    from sakd.tools.plan_memory import estimate

    memory = parse_size(args.device_memory) if args.device_memory else None
    if args.processes < 1:
        raise UserError(f"--processes must be at least 1, got {args.processes}")
    cfg = validate(apply_overrides(read_yaml(args.config), args.set), check_files=False)
    plan = estimate(cfg, args.precision, memory, args.processes, device=args.device)
    print(json.dumps(plan.as_dict(), indent=1) if args.format == "json" else format_plan(plan, args.config))
    return 0


def _bench(args: argparse.Namespace) -> int:
    from sakd.tools.bench import main_from_args

    return main_from_args(args)


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="distil a teacher into a student from a YAML config")
    p.add_argument("config", help="YAML config file")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.lr=1e-4 (repeatable)",
    )
    p.add_argument(
        "--resume", metavar="auto|PATH", help="continue from the newest complete checkpoint or PATH"
    )
    p.add_argument("--force", action="store_true", help="resume even if the config changes the run")
    p.set_defaults(func=_train)


def _eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="perplexity and bits per byte of a student (and a teacher) on text")
    p.add_argument("--student", required=True, help="model folder, .gguf file or hub id")
    p.add_argument("--teacher", help="model folder, .gguf file or hub id")
    p.add_argument("--data", required=True, action="append", help="a .txt/.jsonl file or folder (repeatable)")
    p.add_argument("--output", help="write the results to this JSON file (RUN_DIR/eval.json: in the report)")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-windows", type=int, default=None)
    p.add_argument("--format", choices=["json", "table"], default="table")
    p.add_argument("--top-k", type=int, default=5, help="k of the teacher-student top-k overlap")
    p.add_argument(
        "--gen-new-tokens", type=int, default=32, help="tokens per prompt when timing generation (0: skip)"
    )
    p.add_argument("--device", help="cuda, cpu, ... (default: cuda when available)")
    p.set_defaults(func=_eval)


def _generate_parser(sub) -> None:
    p = sub.add_parser("generate", help="the text a model writes after a prompt (greedy at temperature 0)")
    p.add_argument("--model", required=True, help="model folder (e.g. RUN_DIR/final), .gguf file or hub id")
    p.add_argument("--prompt", required=True, help="the text to continue")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy; above 0: sampling")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--device", help="cuda, cpu, ... (default: cuda when available)")
    p.add_argument("--chat", action="store_true", help="the prompt is a user message for the chat template")
    p.set_defaults(func=_generate)


def _report_parser(sub) -> None:
    p = sub.add_parser("report", help="write RUN_DIR/report.md and report.html (with plots) for a run folder")
    p.add_argument("run_dir", help="the output_dir of a `sakd train` run")
    p.set_defaults(func=_report)


def _demo_parser(sub) -> None:
    p = sub.add_parser("demo", help="offline demo: MoE teacher -> small student with another tokenizer")
    p.add_argument("--quick", action="store_true", help="a smaller run (about 3 minutes on 2 CPU cores)")
    p.add_argument("--workdir", default="demo-runs", help="where the corpus, models and report go")
    p.set_defaults(func=_demo)


def _ablate_parser(sub) -> None:
    p = sub.add_parser("ablate", help="measure each student-aware part on the demo setup")
    p.add_argument("--quick", action="store_true", help="the quick demo's sizes")
    p.add_argument("--workdir", default="demo-runs", help="shared with `sakd demo` (the teacher is reused)")
    p.add_argument("--variant", action="append", default=[], help="run only these variants (repeatable)")
    p.add_argument(
        "--seeds", type=int, default=1, help="run each variant on seeds 0..N-1, paired with plain KD"
    )
    p.set_defaults(func=_ablate)


def _cache_teacher_parser(sub) -> None:
    p = sub.add_parser(
        "cache-teacher", help="run the teacher once over the training data and store its top-k"
    )
    p.add_argument(
        "config", help="YAML config file (the cache goes to teacher.cache or OUTPUT_DIR/teacher-cache)"
    )
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    p.add_argument("--top-k", type=int, default=64, help="teacher tokens stored per position")
    p.add_argument(
        "--batch-size", type=int, default=None, help="windows per teacher forward (train.batch_size)"
    )
    p.add_argument(
        "--shard-windows", type=int, default=1024, help="windows per shard (the unit of resumption)"
    )
    p.add_argument("--probs-dtype", choices=["float16", "float32"], default="float16")
    p.add_argument("--device", help="cuda, cpu, ... (default: cuda when available)")
    p.set_defaults(func=_cache_teacher)


def _plan_parser(sub) -> None:
    p = sub.add_parser("plan", help="estimate per-device memory and a batch size that fits a device")
    p.add_argument("config", help="YAML config file (its data files need not exist)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    p.add_argument("--device-memory", metavar="SIZE", help="e.g. 16GB: suggest batch size and accumulation")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], help="default: the config's")
    p.add_argument(
        "--processes",
        type=int,
        default=1,
        help="processes (devices) of the run: divides sharded parts (train.strategy fsdp, teacher.placement shard)",
    )
    p.add_argument(
        "--device",
        choices=["cuda", "cpu"],
        default="cuda",
        help="cpu: the peak resident size of a CPU process (auto precision: fp32), runtime included",
    )
    p.add_argument("--format", choices=["text", "json"], default="text")
    p.set_defaults(func=_plan)


def _bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="time and peak memory: chunked KD loss, training step, data loading")
    from sakd.tools.bench import add_arguments as add_bench_arguments

    add_bench_arguments(p)
    p.set_defaults(func=_bench)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sakd", description="Student-Aware Knowledge Distillation")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (
        _train_parser,
        _eval_parser,
        _generate_parser,
        _report_parser,
        _demo_parser,
        _ablate_parser,
        _cache_teacher_parser,
        _plan_parser,
        _bench_parser,
    ):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("httpx", "datasets", "transformers", "accelerate", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    from sakd.train.loop import TrainingStopped

    hf_logging.disable_progress_bar()

    try:
        return args.func(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingStopped as e:
        print(f"stopped: {e}", file=sys.stderr)
        return e.code


if __name__ == "__main__":
    raise SystemExit(main())
