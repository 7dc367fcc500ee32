"""The flags of `sakd bench` (shared by the CLI and `python -m sakd.tools.bench`)."""

from __future__ import annotations

import argparse


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
        help="at most rows x vocabulary logits per chunk (default: distill.chunk_logits of the config, or its default on the device)",
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
    _later_parts(p)


def _later_parts(p: argparse.ArgumentParser) -> None:
    """The flags of parts (d) and (e)."""
    g = p.add_argument_group(
        "(f) the reference pair's size from random weights, fp32 on the CPU or --precision on a GPU"
    )
    g.add_argument(
        "--seed-scale",
        action="store_true",
        help="also run a few steps of a 1 B-parameter Qwen3-MoE teacher into a 135 M student (about 10 GiB "
        "of memory and several minutes on 2 CPU cores), with the --set overrides, and compare the peak with "
        "`sakd plan`'s for the same config and device kind",
    )
    g.add_argument("--seed-batch-size", type=int, default=2, help="(default 2)")
    g.add_argument("--seed-max-length", type=int, default=128, help="(default 128)")
    g.add_argument("--seed-steps", type=int, default=3, help="timed steps after one warm-up step (default 3)")
    g = p.add_argument_group("(e) against TRL's GKD trainer (needs trl: pip install -e '.[bench]')")
    g.add_argument("--no-trl", action="store_true", help="skip part (e)")
    g.add_argument(
        "--trl-vocabs",
        type=lambda s: [int(v) for v in s.split(",")],
        help="vocabulary sizes; the vs_trl_*_32k keys are the smallest's, vs_trl_* the largest's "
        "(default 32000,151936)",
    )
    g.add_argument("--trl-batch-size", type=int, help="sequences per step (default 2)")
    g.add_argument("--trl-max-length", type=int, help="tokens per sequence (default 128)")
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
        help="the demo's corpus and pretrained teacher (shared with `sakd demo`), and the seed scale's pair "
        "in WORKDIR/seed-scale (about 4.5 GB): each is built the first time and reused",
    )
    g.add_argument("--epoch-repeats", type=int, default=1, help="live and cached epochs each, alternating")
