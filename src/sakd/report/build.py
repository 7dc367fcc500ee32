"""`sakd report RUN_DIR`: RUN_DIR/report.md and RUN_DIR/report.html (plots embedded) from the run folder alone.

Sections: setup, timeline (start, resumes, evaluations, end), final metrics, warnings, plots, environment and
the resolved config. It reads only files the run wrote, so it works on a finished, stopped or running run.
"""

from __future__ import annotations

import math
from datetime import datetime
from pathlib import Path
from typing import Any

from sakd.report.document import Document
from sakd.report.plots import write_plots
from sakd.report.run_folder import RunFolder, Segment, latest_by_step, load_run

PLOT_CAPTIONS = {
    "loss": "Training loss and its parts per token (the total is weighted by the loss weights)",
    "lr": "Learning rate per optimizer step",
    "grad_norm": "Gradient norm before clipping",
    "eval_bpb": "Held-out bits per byte of the raw and EMA weights",
    "skipped_steps": "Steps skipped for a non-finite loss or gradient",
    "curriculum": "Curriculum loss weights and phases",
    "final": "Final held-out bits per byte (summary.json and eval.json)",
}
MAX_LISTED_SKIPS = 20


def build_report(run_dir: str | Path) -> dict[str, Path]:
    """Write the plots (RUN_DIR/plots/*.png), report.md and report.html; returns {"markdown": ...,
    "html": ..., <plot name>: ...}."""
    run = load_run(run_dir)
    plots = write_plots(run, run.path / "plots")
    doc = report_document(run, plots)
    markdown, html = run.path / "report.md", run.path / "report.html"
    markdown.write_text(doc.markdown())
    html.write_text(doc.html())
    return {"markdown": markdown, "html": html, **plots}


def report_document(run: RunFolder, plots: dict[str, Path]) -> Document:
    doc = Document(f"sakd run report: {run.path.name}")
    doc.paragraph(f"Run folder: {run.path.resolve()}")
    _setup(doc, run)
    _timeline(doc, run)
    _final_metrics(doc, run)
    doc.heading("Warnings")
    warnings = run_warnings(run)
    if warnings:
        doc.items(warnings, warning=True)
    else:
        doc.paragraph("None: no skipped step, no resume, and the run reached max_steps.")
    if plots:
        doc.heading("Plots")
        for name, path in plots.items():
            doc.image(path, PLOT_CAPTIONS.get(name, name), run.path)
    if run.environment:
        doc.heading("Environment")
        doc.table(["key", "value"], [[k, _value(v)] for k, v in run.environment.items()])
    if run.config_text:
        doc.heading("Resolved config (config.yaml)")
        doc.code(run.config_text, "yaml")
    return doc


def _value(v: Any) -> Any:
    if isinstance(v, list):
        return " ".join(map(str, v))
    return v


def _sources(sources: Any) -> str:
    if not sources:
        return "none"
    return ", ".join(s if isinstance(s, str) else str(s.get("hf", s)) for s in sources)


def _setup(doc: Document, run: RunFolder) -> None:
    doc.heading("Setup")
    c = run.config_value
    teacher = c("teacher")
    objective = (run.summary or {}).get("objective") or _last_end(run).get("objective")
    rows = [
        [
            "teacher",
            (teacher or {}).get("model") if teacher else "none (the student trains on the LM loss alone)",
        ],
        ["student", f"{c('student.model')} (init: {c('student.init', 'pretrained')})"],
        ["objective", objective or "unknown (the run has not ended)"],
        ["training data", _sources(c("data.train"))],
        ["held-out data", _sources(c("data.eval"))],
        ["window", f"{c('data.max_length')} tokens per side"],
        [
            "optimisation",
            f"{c('train.max_steps')} steps of batch {c('train.batch_size')} x accumulation "
            f"{c('train.grad_accum')}, lr {c('train.lr')}, warmup {c('train.warmup_steps')}, "
            f"EMA decay {c('train.ema_decay')}",
        ],
    ]
    for section in ("distill", "curriculum", "router"):
        if isinstance(c(section), dict):
            rows.append([section, _compact(c(section))])
    if run.environment:
        env = run.environment
        rows.append(
            [
                "hardware",
                f"{env.get('device')}, {env.get('precision')}, {env.get('num_processes')} process(es)",
            ]
        )
    doc.table(["item", "value"], rows)


def _compact(section: dict[str, Any], limit: int = 400) -> str:
    """`key value, nested.key value, ...` of a config section, cut at `limit` characters."""
    flat: list[str] = []

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}{k}.", v)
        else:
            flat.append(f"{prefix[:-1]} {value}")

    walk("", section)
    text = ", ".join(flat)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _last_end(run: RunFolder) -> dict[str, Any]:
    ends = run.of("end")
    return ends[-1] if ends else {}


def _bpb(record: dict[str, Any], kind: str) -> Any:
    return (record.get(kind) or {}).get("bits_per_byte")


def _segment_line(seg: Segment, is_last: bool) -> str:
    start = (
        "started" if seg.resume is None else f"resumed at step {seg.first_step} from {seg.resume.get('from')}"
    )
    last = seg.last_step
    train = seg.of("train")
    elapsed = train[-1].get("elapsed_s") if train else None
    ends = seg.of("end")
    if ends:
        tail = f"ended at step {ends[-1].get('step')} ({ends[-1].get('stop_reason')})"
    elif is_last:
        tail = f"no end record after step {last}: interrupted, stopped, or still running"
    else:
        tail = f"interrupted after step {last}"
    clock = f", training time so far {elapsed:.1f} s" if isinstance(elapsed, (int, float)) else ""
    return f"segment {seg.index + 1}: {start}; {tail}{clock}"


def _timeline(doc: Document, run: RunFolder) -> None:
    doc.heading("Timeline")
    segments = run.segments()
    doc.items([_segment_line(s, i == len(segments) - 1) for i, s in enumerate(segments)])
    before = _before_training_line(run)
    if before:
        doc.paragraph(before)
    evals = latest_by_step(run.of("eval"))
    if evals:
        rows = [
            [
                e["step"],
                _bpb(e, "raw"),
                _bpb(e, "ema"),
                e.get("best"),
                e.get("kd"),
                (e.get("raw") or {}).get("perplexity"),
            ]
            for e in evals
        ]
        doc.table(
            ["eval at step", "raw bits/byte", "EMA bits/byte", "best", "KD loss", "raw perplexity"], rows
        )
    metrics = run.path / "metrics.jsonl"
    if metrics.exists():
        written = datetime.fromtimestamp(metrics.stat().st_mtime).strftime("%Y-%m-%d %H:%M:%S")
        doc.paragraph(f"Last record written {written} (local time of this machine).")
    end = _last_end(run)
    if end:
        elapsed = end.get("elapsed_s")
        doc.paragraph(
            f"End: step {end.get('step')}, {end.get('stop_reason')}, training time {elapsed} s "
            f"({_duration(elapsed)}), {end.get('tokens_seen')} student tokens seen."
        )


def _before_training(run: RunFolder) -> tuple[Any, Any] | None:
    """(teacher, student) held-out bits per byte measured when the run started; the teacher's is None
    without a loaded teacher (a cache, or no teacher); None when the run did not measure them."""
    records = run.of("before_training")
    if not records:
        return None
    return _bpb(records[0], "teacher"), _bpb(records[0], "student")


def _before_training_line(run: RunFolder) -> str | None:
    measured = _before_training(run)
    if measured is None:
        return None
    teacher, student = measured
    line = "before training: " + (f"teacher {teacher:.4f} bpb, " if teacher is not None else "")
    return line + f"student {student:.4f} bpb (held-out bits per byte)"


def _duration(seconds: Any) -> str:
    if not isinstance(seconds, (int, float)):
        return "unknown"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m {secs:02d}s"


def _final_metrics(doc: Document, run: RunFolder) -> None:
    doc.heading("Final metrics")
    summary = run.summary
    if not summary:
        doc.paragraph("No summary.json: the run has not finished.")
    else:
        final = summary.get("final") or {}
        rows = [
            ["optimizer steps", summary.get("step")],
            ["skipped steps", summary.get("skipped_steps")],
            ["student tokens seen", summary.get("tokens_seen")],
            ["training time (s)", summary.get("elapsed_s")],
            ["stop reason", summary.get("stop_reason")],
            ["objective", summary.get("objective")],
            ["exported weights (final/)", final.get("weights")],
            ["exported held-out bits per byte", final.get("bits_per_byte")],
        ]
        final_eval = summary.get("eval") or {}
        for kind in ("raw", "ema"):
            metrics = final_eval.get(kind) or {}
            for key in ("bits_per_byte", "perplexity", "loss"):
                if key in metrics:
                    rows.append([f"{kind} {key.replace('_', ' ')}", metrics[key]])
        for key in ("kd", "distill_loss"):
            if key in final_eval:
                rows.append([f"held-out {key.replace('_', ' ')}", final_eval[key]])
        for part, value in (final_eval.get("parts") or {}).items():
            rows.append([f"held-out {part} loss", value])
        doc.table(["metric", "value"], rows)
    result = run.eval_result
    if result:
        roles = [r for r in ("student", "teacher") if r in result]
        doc.paragraph(f"sakd eval (eval.json) on {', '.join(map(str, result.get('data', [])))}:")
        keys = ["bits_per_byte", "perplexity", "loss", "tokens", "parameters", "size_on_disk_bytes"]
        names = {"size_on_disk_bytes": "weights on disk (bytes)", "loss": "loss (nats/token)"}
        rows = [[names.get(k, k.replace("_", " "))] + [result[r].get(k) for r in roles] for k in keys]
        rows.append(
            ["greedy tokens/s"] + [(result[r].get("generation") or {}).get("tokens_per_s") for r in roles]
        )
        doc.table(["metric", *roles], rows)
        agreement = result.get("agreement")
        if agreement:
            doc.table(
                ["agreement", "value"],
                [
                    ["compression ratio (parameters)", result.get("compression_ratio")],
                    ["top-1 agreement", agreement.get("top1_agreement")],
                    [f"top-{agreement.get('top_k')} overlap", agreement.get("top_k_overlap")],
                    ["KL(teacher || student)", agreement.get("kl")],
                    ["KL kind", agreement.get("kl_kind")],
                    ["aligned positions", agreement.get("positions")],
                ],
            )


def _nonfinite(value: Any) -> bool:
    return isinstance(value, float) and not math.isfinite(value)


def run_warnings(run: RunFolder) -> list[str]:
    """What a reader must not miss: skipped steps (with window ids), resumes and repeated steps, stops before
    max_steps, a run without an end, non-finite evaluations, a teacher that was not better than the student
    before training, unreadable log lines."""
    warnings = []
    skips = run.of("skip")
    if skips:
        warnings.append(f"{len(skips)} step(s) skipped for a non-finite loss or gradient:")
        for s in skips[:MAX_LISTED_SKIPS]:
            warnings.append(
                f"step {s.get('step')}: windows {s.get('windows')} (loss {s.get('loss')}, "
                f"gradient norm {s.get('grad_norm')})"
            )
        if len(skips) > MAX_LISTED_SKIPS:
            warnings.append(f"... and {len(skips) - MAX_LISTED_SKIPS} more skipped steps in metrics.jsonl")
    segments = run.segments()
    for prev, seg in zip(segments, segments[1:], strict=False):
        line = f"resumed segment {seg.index + 1}: the run was resumed at step {seg.first_step}"
        line += f" from checkpoint {seg.resume.get('from')}"
        if prev.last_step is not None and prev.last_step > seg.first_step:
            line += (
                f"; steps {seg.first_step + 1}-{prev.last_step} of the interrupted segment were trained again "
                "(their later records are the ones plotted)"
            )
        warnings.append(line)
    stop_reason = (run.summary or _last_end(run)).get("stop_reason")
    if stop_reason == "early stop":
        warnings.append(
            f"stopped early: held-out bits per byte did not improve for {run.config_value('train.early_stop_patience')}"
            " evaluations (train.early_stop_patience)"
        )
    elif stop_reason and stop_reason != "max_steps":
        warnings.append(f"stopped before max_steps: {stop_reason}")
    if not run.of("end"):
        warnings.append(_no_end_reason(run))
    for e in run.of("eval"):
        bad = [k for k in ("raw", "ema") if _nonfinite(_bpb(e, k))]
        if bad:
            warnings.append(
                f"non-finite held-out bits per byte at step {e.get('step')} ({', '.join(bad)} weights)"
            )
    measured = _before_training(run)
    if measured is not None and measured[0] is not None and not measured[0] < measured[1]:
        warnings.append(
            f"the teacher ({measured[0]:.4f} bits per byte) was not better than the student ({measured[1]:.4f}) "
            "before training: distillation from it will likely make the student worse"
        )
    if run.bad_lines:
        warnings.append(f"{run.bad_lines} unreadable line(s) in metrics.jsonl (a record cut short by a kill)")
    return warnings


def _no_end_reason(run: RunFolder) -> str:
    steps = [r["step"] for r in run.records if isinstance(r.get("step"), int)]
    last = max(steps) if steps else 0
    window = run.config_value("train.nonfinite_window", 100)
    limit = run.config_value("train.nonfinite_max_rate", 0.01) * window
    recent = {s["step"] for s in run.of("skip") if s["step"] > last - window}
    if recent and len(recent) > limit:
        return (
            f"the run has no end record: {len(recent)} of its last {window} steps were skipped for non-finite "
            "values, so it most likely stopped on the non-finite rate (see `sakd train` stderr); resume after "
            "fixing the cause with --resume auto"
        )
    return (
        f"the run has no end record (last logged step {last}): it was interrupted (signal, crash, time limit of "
        "the machine) or is still running; continue it with `sakd train CONFIG --resume auto`"
    )
