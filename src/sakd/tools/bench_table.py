"""The readable view of a `sakd bench` result: one table per part, then the summary against the targets."""

from __future__ import annotations

import math
from typing import Any


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _console():
    from rich.console import Console

    return Console(width=max(Console().width, 110))


def render(result: dict[str, Any]) -> None:
    """The readable view: one table per part, then the summary against the targets."""
    console = _console()
    _header(console, result)
    _loss_table(console, result)
    _step_table(console, result)
    _data_table(console, result)
    if result.get("cache_epoch"):
        _cache_epoch_table(console, result["cache_epoch"])
    _summary_table(console, result)


def _header(console, result: dict[str, Any]) -> None:
    """The device, threads and load, and a note when other processes kept the cores busy."""
    console.print(
        f"[bold]sakd bench[/bold] on {result['device']} ({result['device_info']['torch_threads']} torch "
        f"threads; load average {result['load_average_start']} -> {result['load_average_end']}), "
        f"{result['total_s']} s"
    )
    info = result["device_info"]
    loads = [x[0] for x in (result["load_average_start"], result["load_average_end"]) if x]
    if info["type"] == "cpu" and loads and max(loads) > info["cpu_count"]:
        why = (
            " (with several torch threads every op can wait for a descheduled one; --threads 1 avoids that)"
            if info["torch_threads"] > 1
            else ""
        )
        console.print(
            f"  [bold]note:[/bold] other processes kept the {info['cpu_count']} cores busy: timings are "
            f"inflated and noisy{why}"
        )


def _table(title: str, columns: tuple[str, ...], left: tuple[str, ...] = ()):
    """A table with `columns`, right-justified but for those in `left`."""
    from rich.table import Table

    t = Table(title=title)
    for col in columns:
        t.add_column(col, justify="left" if col in left else "right")
    return t


def _loss_table(console, result: dict[str, Any]) -> None:
    """Part (a): the chunked against the full loss, per vocabulary, and the memory method's check."""
    loss, s = result["loss"], result["settings"]
    t = _table(
        f"(a) KD loss forward+backward (lm + forward KL), {s['tokens']} tokens, hidden {s['hidden']}, "
        f"chunks of <= {s['chunk_size']} rows and <= {s['chunk_logits']} logits",
        ("vocab", "variant", "median s", "passes", "peak MiB", "chunked/full time", "chunked/full memory"),
        left=("variant",),
    )
    for row in loss["results"]:
        ratio = loss["ratios"][str(row["vocab"])] if row["variant"] == "chunked" else {}
        if row["status"] == "ok":
            cells = [_fmt(row["median_s"], 3), str(len(row["times_s"])), _fmt(row["peak_mb"], 1)]
        else:
            cells = [row["status"], "-", f"({row['note']})"]
        variant = row["variant"] + (f" ({row['chunk_size']} rows)" if row["chunk_size"] else "")
        t.add_row(
            str(row["vocab"]),
            variant,
            *cells,
            _fmt(ratio.get("time_ratio")),
            _fmt(ratio.get("memory_ratio")),
        )
    console.print(t)
    console.print(f"  memory method: {loss['method']}")
    if loss["calibration"]:
        c = loss["calibration"]
        console.print(
            f"  method check: a known {c['allocated_mb']} MiB allocation measured as "
            f"{_fmt(c.get('measured_mb'), 1)} MiB ({c.get('memory_method', c.get('error'))})"
        )


def _step_table(console, result: dict[str, Any]) -> None:
    """Part (b): student tokens/s of sakd's step against the reference and the cached step, per pair."""
    step, s = result["step"], result["settings"]
    t = _table(
        f"(b) training step, batch {s['batch_size']} x {s['max_length']} tokens, precision "
        f"{s['precision']}: student tokens/s (median of {s['steps']} steps each, alternating)",
        (
            "tokenizers",
            "vocab t/s",
            "sakd",
            "reference",
            "sakd/reference",
            "sakd cached",
            "cached/sakd",
            "sakd step",
        ),
        left=("tokenizers", "sakd step"),
    )
    for name in ("same_vocab", "cross_vocab"):
        r = step[name]
        setup = r["sakd_setup"]
        desc = (
            f"{setup['objective']}, phase {setup['phase']} ({'+'.join(setup['active_losses'])}), "
            f"{setup['attention']} attention{', EMA' if setup['ema'] else ''}"
        )
        t.add_row(
            name.replace("_", " "),
            f"{r['teacher_vocab']}/{r['student_vocab']}",
            _fmt(r["sakd"]["tokens_per_s"], 0),
            _fmt(r["reference"]["tokens_per_s"], 0),
            _fmt(r["ratio"]),
            _fmt(r["sakd_cached"]["tokens_per_s"], 0),
            _fmt(r["cache_speedup"]),
            desc,
        )
    console.print(t)
    console.print(f"  cross-vocab reference: {step['cross_vocab']['reference_note']}")
    c = step["cross_vocab"]
    console.print(
        f"  cached: top-{c['cache']['top_k']} teacher rows read from the cache (captured once in "
        f"{c['cache']['capture_s']} s, not timed), no teacher loaded; teacher/student parameters "
        f"{c['teacher_to_student_parameters']:.1f}"
    )


def _data_table(console, result: dict[str, Any]) -> None:
    """Part (c): the data pipeline's rates against training's."""
    d = result["data"]
    t = _table(
        "(c) data: dual tokenization + alignment + packing + collation (cross tokenizers)",
        (
            "windows",
            "student tokens",
            "windows/s",
            "tokens/s",
            "collation tokens/s",
            "train tokens/s",
            "data/train",
        ),
    )
    t.add_row(
        str(d["windows"]),
        str(d["student_tokens"]),
        _fmt(d["windows_per_s"], 0),
        _fmt(d["tokens_per_s"], 0),
        _fmt(d["collate_tokens_per_s"], 0),
        _fmt(d["train_tokens_per_s"], 0),
        _fmt(result["data_to_train_ratio"], 1),
    )
    console.print(t)


def _cache_epoch_table(console, epoch: dict[str, Any]) -> None:
    """Part (d): one demo epoch live and from the teacher cache, its speedup and bits-per-byte difference."""
    t = _table(
        f"(d) one epoch of the {epoch['setup']} ({epoch['steps']} steps, teacher "
        f"{epoch['teacher_to_student_parameters']:.1f}x the student's parameters), live vs top-"
        f"{epoch['top_k']} teacher cache",
        ("run", "loop s (each repeat)", "held-out bits per byte"),
        left=("run",),
    )
    t.add_row("live", " ".join(_fmt(x, 1) for x in epoch["live_s"]), _fmt(epoch["live_bpb"], 4))
    t.add_row("cached", " ".join(_fmt(x, 1) for x in epoch["cached_s"]), _fmt(epoch["cached_bpb"], 4))
    console.print(t)
    mass = epoch["top_k_mass"]
    console.print(
        f"  speedup {_fmt(epoch['speedup'])} (pairs {_fmt(epoch['speedup_range'][0])}-"
        f"{_fmt(epoch['speedup_range'][1])}); cached - live bits per byte "
        f"{_fmt(100 * epoch['bpb_relative_difference'], 2)}%; the top-{epoch['top_k']} holds "
        f"{'-' if mass is None else f'{100 * mass:.0f}%'} of the teacher's probability"
    )


def _summary_table(console, result: dict[str, Any]) -> None:
    """Every measure against its target."""
    columns = ("measure", "value", "target", "met")
    t = _table("summary", columns, left=columns)
    for name, target in result["targets"].items():
        met = {True: "yes", False: "NO", None: "not measured"}[target["met"]]
        if target["met"] is None and name.startswith("loss_") and result.get("loss_note"):
            met += f" ({result['loss_note']})"
        t.add_row(
            name, _fmt(result[name], 4 if name.endswith("bpb_difference") else 2), target["target"], met
        )
    console.print(t)
    console.print(
        f"  loss ratios at vocabulary {result['loss_ratio_vocab']}; data_to_train_ratio and cache_speedup "
        "(cached / live sakd step tokens/s) on the cross-tokenizer pair"
    )


def render_extra(result: dict[str, Any]) -> None:
    """The parts after the summary's own: cache efficiency, (e) against TRL, and the seed-scale run."""
    from rich.table import Table

    console = _console()
    cross = result.get("step", {}).get("cross_vocab", {})
    if cross.get("teacher_forward_s") is not None:
        console.print(
            f"  cache efficiency (cross tokenizer): teacher forward {_fmt(1000 * cross['teacher_forward_s'], 1)}"
            f" ms of a {_fmt(1000 * cross['live_step_s'], 1)} ms live step -> ideal speedup "
            f"{_fmt(cross['cache_ideal_speedup'])}, measured {_fmt(result['cache_speedup'])}, efficiency "
            f"{_fmt(result.get('cache_efficiency'))}"
        )
    trl = result.get("trl", {})
    if "results" in trl:
        z = trl["sizes"]
        t = Table(
            title=f"(e) sakd vs TRL {trl['trl_version']}, fp32 CPU, batch {z['batch_size']} x "
            f"{z['max_length']} tokens, median of {z['steps']} steps; TRL's GKDTrainer and DistillationTrainer's "
            "chunked loss; ratios against TRL's faster / leaner; memory = what training adds to the loaded models"
        )
        sides = ("sakd", "trl", "trl_chunked")
        for col in (
            "vocab",
            "divergence",
            "t/s: sakd",
            "GKD",
            "chunked",
            "speed",
            "MiB: sakd",
            "GKD",
            "chunked",
        ):
            t.add_column(col, justify="left" if col == "divergence" else "right")
        t.add_column("memory", justify="right")
        for vocab, rows in trl["results"].items():
            for divergence, r in rows.items():
                rate = [_fmt(r[s].get("tokens_per_s"), 0) if "error" not in r[s] else "failed" for s in sides]
                peak = [_fmt(r[s].get("peak_mb"), 1) for s in sides]
                t.add_row(vocab, divergence, *rate, _fmt(r["speed_ratio"]), *peak, _fmt(r["memory_ratio"]))
        console.print(t)
        gold = trl.get("gold", {})
        if gold.get("speed_ratio") is not None:
            console.print(
                f"  across tokenizers ({gold['teacher_vocab']} -> {gold['student_vocab']}), ULD on both sides: sakd "
                f"{_fmt(gold['sakd']['tokens_per_s'], 0)} t/s, TRL GOLD {_fmt(gold['gold']['tokens_per_s'], 0)} "
                f"t/s, ratio {_fmt(gold['speed_ratio'])}"
            )
        elif gold:
            console.print(
                f"  TRL GOLD: {gold.get('gold', {}).get('error') or gold.get('sakd', {}).get('error')}"
            )
    elif "skipped" in trl:
        console.print(f"  (e) against TRL: skipped ({trl['skipped']})")
    seed = result.get("seed_scale")
    if seed and "error" in seed:
        console.print(f"  (f) seed scale failed: {seed['error']}")
    elif seed:
        console.print(
            f"  seed scale ({seed.get('device', 'cpu')}, {seed.get('precision', 'fp32')}): "
            f"{_fmt(result['seed_scale_tokens_per_s'], 1)} tokens/s, peak "
            f"{_fmt(result['seed_scale_peak_gib'])} GiB, plan {_fmt(seed['plan_gib'])} GiB, plan_error "
            f"{_fmt(result['plan_error'], 3)}"
        )
