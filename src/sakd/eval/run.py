"""`sakd eval`: a student (and a teacher) on any text source.

Per model: perplexity and bits per byte on windows of its own tokenizer, parameters, size on disk of its
weight files and greedy decoding speed. With a teacher: the compression ratio and teacher-student agreement
(top-1, top-k overlap, KL) on windows built with both tokenizers, so that positions are aligned.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sakd.data.corpus import build_windows
from sakd.data.loader import WindowLoader
from sakd.data.packing import collate_windows
from sakd.data.tokenize import input_format, log_input_format
from sakd.errors import UserError
from sakd.eval.agreement import agreement_metrics
from sakd.eval.metrics import lm_metrics
from sakd.generate import generation_speed
from sakd.losses import build_vocab_mapping
from sakd.models.head import check_head
from sakd.models.load import count_parameters, load_model, load_tokenizer

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf")


def _device(device: str | None) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def weights_size_on_disk(model_ref: str) -> int | None:
    """Bytes of the weight files of a model folder (or of a hub model in the local cache, or of a single GGUF
    file); None if unknown."""
    folder = Path(model_ref).expanduser()
    if folder.is_file():
        return folder.stat().st_size
    if not folder.is_dir():
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(model_ref, local_files_only=True))
        except Exception:  # not cached or not a hub id: the size is simply unknown
            return None
    files = [p for p in folder.rglob("*") if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES)]
    return sum(p.stat().st_size for p in files) if files else None


@dataclass(frozen=True)
class EvalData:
    """What an evaluation reads: the held-out sources, cut into windows of `max_length` tokens (at most
    `max_windows` of them), `batch_size` windows at a time."""

    sources: list
    max_length: int = 256
    batch_size: int = 8
    max_windows: int | None = None


def model_metrics(
    model: nn.Module, tokenizer, model_ref: str, role: str, data: EvalData, gen_new_tokens: int = 32
) -> dict[str, Any]:
    """Perplexity, bits per byte, parameters, size on disk and (unless `gen_new_tokens` is 0) decoding speed."""
    device = next(model.parameters()).device
    windows = build_windows(data.sources, tokenizer, None, data.max_length, data.max_windows, role)
    if not windows:
        raise UserError(f"the evaluation data gives no window of tokens for the {role}: use more text")
    log_input_format(tokenizer, role)
    fmt = input_format(tokenizer)
    probe = collate_windows(windows[:2], fmt, None).to(device).student
    check_head(model, probe.input_ids, probe.attention_mask, role)
    loader = WindowLoader(windows, data.batch_size, seed=0, shuffle=False, drop_last=False, student=fmt)
    metrics: dict[str, Any] = lm_metrics(model, loader, "student", device)
    metrics["parameters"] = count_parameters(model)
    metrics["windows"] = len(windows)
    metrics["size_on_disk_bytes"] = weights_size_on_disk(model_ref)
    if gen_new_tokens > 0:
        metrics["generation"] = generation_speed(model, tokenizer, max_new_tokens=gen_new_tokens)
    return metrics


def evaluate_model(
    model_ref: str, role: str, data: EvalData, device: str | None = None, gen_new_tokens: int = 0
) -> dict[str, Any]:
    """Load `model_ref` and return its `model_metrics` (decoding speed only when `gen_new_tokens` > 0)."""
    tokenizer = load_tokenizer(model_ref, role)
    model = load_model(model_ref, role, torch.float32).to(_device(device))
    return model_metrics(model, tokenizer, model_ref, role, data, gen_new_tokens)


def evaluate_agreement(
    student: nn.Module,
    student_tokenizer,
    teacher: nn.Module,
    teacher_tokenizer,
    data: EvalData,
    top_k: int = 5,
    chunk_size: int = 256,
) -> dict[str, Any]:
    """`agreement_metrics` on windows of the held-out data built with both tokenizers."""
    windows = build_windows(
        data.sources, student_tokenizer, teacher_tokenizer, data.max_length, data.max_windows
    )
    if not windows:
        raise UserError(
            "the evaluation data gives no window aligned between teacher and student: use more text"
        )
    loader = WindowLoader(
        windows,
        data.batch_size,
        seed=0,
        shuffle=False,
        drop_last=False,
        student=input_format(student_tokenizer),
        teacher=input_format(teacher_tokenizer),
    )
    same_vocab = teacher_tokenizer.get_vocab() == student_tokenizer.get_vocab()
    mapping = None if same_vocab else build_vocab_mapping(teacher_tokenizer, student_tokenizer)
    result = agreement_metrics(
        student,
        teacher,
        loader,
        mapping,
        vocab_size=len(student_tokenizer) if same_vocab else None,
        top_k=top_k,
        device=next(student.parameters()).device,
        chunk_size=chunk_size,
    )
    result["windows"] = len(windows)
    if mapping is not None:
        result["vocab_mapping_coverage"] = mapping.coverage
    return result


def run_eval(
    student: str,
    teacher: str | None,
    data: EvalData,
    output: str | None = None,
    device: str | None = None,
    top_k: int = 5,
    gen_new_tokens: int = 32,
) -> dict[str, Any]:
    """All of `sakd eval`; written to `output` as JSON when given."""
    dev = _device(device)
    student_tok = load_tokenizer(student, "student")
    student_model = load_model(student, "student", torch.float32).to(dev)
    result: dict[str, Any] = {
        "data": [str(s) for s in data.sources],
        "student": model_metrics(student_model, student_tok, student, "student", data, gen_new_tokens),
    }
    if teacher:
        teacher_tok = load_tokenizer(teacher, "teacher")
        teacher_model = load_model(teacher, "teacher", torch.float32).to(dev)
        result["teacher"] = model_metrics(
            teacher_model, teacher_tok, teacher, "teacher", data, gen_new_tokens
        )
        s, t = result["student"], result["teacher"]
        result["compression_ratio"] = t["parameters"] / s["parameters"]
        if s["size_on_disk_bytes"] and t["size_on_disk_bytes"]:
            result["size_ratio"] = t["size_on_disk_bytes"] / s["size_on_disk_bytes"]
        result["agreement"] = evaluate_agreement(
            student_model, student_tok, teacher_model, teacher_tok, data, top_k=top_k
        )
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(json.dumps(result, indent=1))
    return result


def _fmt(value: Any, spec: str = ".4f") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return format(value, spec)
    return format(value, ",") if isinstance(value, int) else str(value)


def _size(nbytes: int | None) -> str:
    if nbytes is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if nbytes < 1024 or unit == "GB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return "-"


def result_table(result: dict[str, Any]) -> list:
    """The `--format table` view of a `run_eval` result: rich tables (models side by side, then agreement)."""
    from rich.table import Table

    roles = [r for r in ("student", "teacher") if r in result]
    models = Table(title="held-out metrics (" + ", ".join(result.get("data", [])) + ")")
    models.add_column("metric")
    for role in roles:
        models.add_column(role, justify="right")

    def gen(m: dict, key: str) -> Any:
        return m.get("generation", {}).get(key)

    rows = [
        ("bits/byte", lambda m: _fmt(m["bits_per_byte"])),
        ("perplexity", lambda m: _fmt(m["perplexity"], ".2f")),
        ("loss (nats/token)", lambda m: _fmt(m["loss"])),
        ("tokens", lambda m: _fmt(m["tokens"])),
        ("bytes", lambda m: _fmt(m["bytes"])),
        ("windows", lambda m: _fmt(m["windows"])),
        ("parameters", lambda m: _fmt(m["parameters"])),
        ("size on disk", lambda m: _size(m.get("size_on_disk_bytes"))),
        ("greedy tokens/s", lambda m: _fmt(gen(m, "tokens_per_s"), ".1f")),
        ("latency per prompt (s)", lambda m: _fmt(gen(m, "latency_s"), ".3f")),
    ]
    for name, cell in rows:
        models.add_row(name, *(cell(result[role]) for role in roles))
    tables = [models]
    if "agreement" in result:
        a = result["agreement"]
        agree = Table(title="teacher-student agreement on aligned positions")
        agree.add_column("metric")
        agree.add_column("value", justify="right")
        agree.add_row("compression ratio (parameters)", _fmt(result["compression_ratio"], ".2f") + "x")
        if "size_ratio" in result:
            agree.add_row("size ratio (disk)", _fmt(result["size_ratio"], ".2f") + "x")
        agree.add_row("top-1 agreement", _fmt(a["top1_agreement"]))
        agree.add_row(f"top-{a['top_k']} overlap", _fmt(a["top_k_overlap"]))
        agree.add_row("KL(teacher || student)", _fmt(a["kl"]))
        agree.add_row("KL kind", a["kl_kind"])
        agree.add_row("aligned positions", _fmt(a["positions"]))
        if a["unscored_positions"]:
            agree.add_row("positions without mapped teacher mass", _fmt(a["unscored_positions"]))
        if "vocab_mapping_coverage" in a:
            agree.add_row("vocabulary mapping coverage", _fmt(a["vocab_mapping_coverage"], ".3f"))
        tables.append(agree)
    return tables


def print_table(result: dict[str, Any]) -> None:
    from rich.console import Console

    console = Console()
    for table in result_table(result):
        console.print(table)
