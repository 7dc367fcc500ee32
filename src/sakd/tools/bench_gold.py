"""`sakd bench` part (e), two tokenizers: sakd's step against TRL's cross-tokenizer GOLD trainer, fp32 CPU.

Both use ULD (sorted-probability distance between the teacher's and the student's next-token distributions),
sakd as `distill.cross_vocab: uld`, GOLD as `use_uld_loss` in its positional form (`use_extended_uld: false`,
the original paper's, and the lighter of its two), with no cross-entropy term, temperature 1, off-policy. The
pair: a word-level teacher tokenizer over exactly the teacher's vocabulary and a byte-level BPE student
tokenizer trained on the same random-word text, so that their token boundaries differ. GOLD re-tokenizes each
window's text for the teacher itself, as it does in training; its step is `compute_loss`, backward, clipping,
optimizer and scheduler step (its `training_step` would also fill its generation buffers); see
`bench_trl_runners.gold_runner`.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict
from pathlib import Path
from typing import Any

from sakd.tools.bench_pairs import TrlSizes, word_tokenizer


def build_cross_pair(
    root: Path, teacher_vocab: int, student_vocab: int, sizes: TrlSizes
) -> tuple[dict[str, str], dict[str, int]]:
    """Corpus of random words, the two tokenizers, and a teacher and a student of Llama shape; the paths and
    the tokenizers' sizes (a byte-level BPE has at least its 256 bytes and 2 special tokens)."""
    import torch
    from transformers import AutoModelForCausalLM

    from sakd.models.tiny import dense_student_config, train_tokenizer

    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    words = max(
        20 * student_vocab, sizes.batch_size * sizes.max_length * (sizes.warmup_steps + sizes.steps + 2)
    )
    lines = [
        " ".join(f"w{rng.randrange(teacher_vocab - 3)}" for _ in range(500)) for _ in range(0, words, 500)
    ]
    corpus = root / "corpus.jsonl"
    with corpus.open("w") as f:
        f.writelines(json.dumps({"text": line}) + "\n" for line in lines)
    tokenizers = {"teacher": word_tokenizer(teacher_vocab), "student": train_tokenizer(lines, student_vocab)}
    paths = {"corpus": str(corpus)}
    for role, hidden in (("teacher", sizes.teacher_hidden), ("student", sizes.student_hidden)):
        torch.manual_seed(0)
        config = dense_student_config(
            len(tokenizers[role]), hidden, sizes.layers, max_length=2 * sizes.max_length
        )
        AutoModelForCausalLM.from_config(config).save_pretrained(root / role)
        tokenizers[role].save_pretrained(root / role)
        paths[role] = str(root / role)
    return paths, {f"{role}_vocab": len(tok) for role, tok in tokenizers.items()}


def run_gold_bench(root: Path, sizes: TrlSizes, teacher_vocab: int, student_vocab: int, threads: int):
    """sakd (cross_vocab uld) and GOLD (ULD) on the same cross-tokenizer pair, each in a fresh process."""
    from sakd.tools.bench_loss import in_fresh_process

    paths, vocabs = build_cross_pair(root, teacher_vocab, student_vocab, sizes)
    row: dict[str, Any] = dict(vocabs)
    for side in ("sakd", "gold"):
        spec = {
            "side": side,
            "divergence": "forward_kl",
            "cross_vocab": "uld",
            "paths": paths,
            "sizes": asdict(sizes),
            "out": str(root / side),
            "threads": threads,
        }
        row[side] = in_fresh_process("sakd.tools.bench_trl:measure_side", spec)
    ok = all("error" not in row[s] for s in ("sakd", "gold"))
    row["speed_ratio"] = row["sakd"]["tokens_per_s"] / row["gold"]["tokens_per_s"] if ok else None
    return row
