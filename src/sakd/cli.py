"""The `sakd` command line: train, eval, demo. A user's mistake prints one `error:` line and exits with 2."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from sakd.errors import UserError


def _train(args: argparse.Namespace) -> int:
    from sakd.config import load_config
    from sakd.train.loop import train

    cfg = load_config(args.config, args.set)
    summary = train(cfg, resume=args.resume, force=args.force)
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
    from sakd.eval.run import run_eval

    result = run_eval(
        args.student,
        args.teacher,
        args.data,
        args.output,
        max_length=args.max_length,
        batch_size=args.batch_size,
        max_windows=args.max_windows,
    )
    if args.format == "json":
        print(json.dumps(result, indent=1))
    else:
        for role in ("student", "teacher"):
            if role in result:
                m = result[role]
                print(
                    f"{role:8s} bits/byte {m['bits_per_byte']:.4f}  perplexity {m['perplexity']:.2f}  "
                    f"tokens {m['tokens']}  parameters {m['parameters']:,}"
                )
    return 0


def _demo(args: argparse.Namespace) -> int:
    from sakd.demo import run_demo

    run_demo(args.workdir, quick=args.quick)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sakd", description="Student-Aware Knowledge Distillation")
    sub = parser.add_subparsers(dest="command", required=True)

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

    p = sub.add_parser("eval", help="perplexity and bits per byte of a student (and a teacher) on text")
    p.add_argument("--student", required=True, help="model folder or hub id")
    p.add_argument("--teacher", help="model folder or hub id")
    p.add_argument("--data", required=True, action="append", help="a .txt/.jsonl file or folder (repeatable)")
    p.add_argument("--output", help="write the results to this JSON file")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-windows", type=int, default=None)
    p.add_argument("--format", choices=["json", "table"], default="table")
    p.set_defaults(func=_eval)

    p = sub.add_parser("demo", help="offline demo: MoE teacher -> small student with another tokenizer")
    p.add_argument("--quick", action="store_true", help="a smaller run (about 3 minutes on 2 CPU cores)")
    p.add_argument("--workdir", default="demo-runs", help="where the corpus, models and report go")
    p.set_defaults(func=_demo)
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
