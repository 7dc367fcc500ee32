"""PNG plots of a run folder, drawn with matplotlib's Agg canvas (no display, no global pyplot state).

Each plot function returns its path, or None when the run has nothing to show for it (no held-out data, no
skipped step, no curriculum keys). Dotted vertical lines mark where the run was resumed. Series longer than
`MAX_POINTS` are thinned to every n-th point.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from sakd.report.run_folder import RunFolder, latest_by_step

MAX_POINTS = 4000


def _figure(title: str, ylabel: str, xlabel: str = "optimizer step") -> tuple[Figure, Any]:
    fig = Figure(figsize=(7.0, 3.6), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    return fig, ax


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def _series(records: list[dict[str, Any]], get: Callable[[dict[str, Any]], Any]) -> tuple[list, list]:
    points = [(r["step"], get(r)) for r in records]
    points = [(s, float(v)) for s, v in points if isinstance(v, (int, float)) and not isinstance(v, bool)]
    stride = -(-len(points) // MAX_POINTS) if points else 1
    points = points[::stride]
    return [s for s, _ in points], [v for _, v in points]


def _mark_resumes(ax, run: RunFolder) -> None:
    for i, resume in enumerate(run.of("resume")):
        ax.axvline(resume["step"], color="grey", linestyle=":", label="resumed" if i == 0 else None)


def _line_plot(
    run: RunFolder,
    path: Path,
    title: str,
    ylabel: str,
    records: list[dict[str, Any]],
    lines: dict[str, Callable[[dict[str, Any]], Any]],
    log_y: bool = False,
    marker: str | None = None,
) -> Path | None:
    fig, ax = _figure(title, ylabel)
    drawn = False
    for label, get in lines.items():
        steps, values = _series(records, get)
        if steps:
            ax.plot(steps, values, label=label, marker=marker)
            drawn = True
    if not drawn:
        return None
    if log_y and all(v > 0 for line in ax.get_lines() for v in line.get_ydata()):
        ax.set_yscale("log")
    _mark_resumes(ax, run)
    ax.legend(loc="best", fontsize="small")
    return _save(fig, path)


def plot_losses(run: RunFolder, path: Path) -> Path | None:
    train = latest_by_step(run.of("train"))
    keys = sorted({k for r in train for k in r if k.startswith("loss_")})
    lines = {"total (weighted)": lambda r: r.get("loss")}
    lines.update({k.removeprefix("loss_"): (lambda r, k=k: r.get(k)) for k in keys})
    return _line_plot(run, path, "training loss and its parts (per token)", "loss", train, lines)


def plot_lr(run: RunFolder, path: Path) -> Path | None:
    train = latest_by_step(run.of("train"))
    return _line_plot(run, path, "learning rate", "lr", train, {"lr": lambda r: r.get("lr")})


def plot_grad_norm(run: RunFolder, path: Path) -> Path | None:
    train = latest_by_step(run.of("train"))
    lines = {"gradient norm (before clipping)": lambda r: r.get("grad_norm")}
    return _line_plot(run, path, "gradient norm", "norm", train, lines, log_y=True)


def plot_eval(run: RunFolder, path: Path) -> Path | None:
    evals = latest_by_step(run.of("eval"))
    lines = {
        "raw weights": lambda r: (r.get("raw") or {}).get("bits_per_byte"),
        "EMA weights": lambda r: (r.get("ema") or {}).get("bits_per_byte"),
    }
    return _line_plot(run, path, "held-out bits per byte", "bits per byte", evals, lines, marker="o")


def plot_skips(run: RunFolder, path: Path) -> Path | None:
    skips = run.of("skip")
    if not skips:
        return None
    fig, ax = _figure("skipped steps (non-finite loss or gradient)", "skipped steps so far")
    steps = sorted({r["step"] for r in skips})
    last = max([steps[-1], *(r["step"] for r in run.of("train"))])
    # Over the whole run, so that it shows whether skips cluster (a diverging run) or are isolated.
    ax.step([0, *steps, last], [0, *range(1, len(steps) + 1), len(steps)], where="post", color="tab:red")
    ax.plot(steps, range(1, len(steps) + 1), "x", color="tab:red", label="skipped step")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    _mark_resumes(ax, run)
    ax.legend(loc="best", fontsize="small")
    return _save(fig, path)


def plot_curriculum(run: RunFolder, path: Path) -> Path | None:
    """Loss weights (`weight_<name>` keys of train records) with the phases (`phase`) shaded, and the
    distillation temperature and router top-k (`temperature`, `top_k`) below, for whichever the run logs."""
    train = latest_by_step(run.of("train"))
    # A loss whose weight stays 0 is off for the whole run: left out, so the others can be told apart.
    keys = sorted({k for r in train for k, v in r.items() if k.startswith("weight_") and v})
    schedules = [k for k in ("temperature", "top_k") if any(k in r for r in train)]
    phases = [(r["step"], r["phase"]) for r in train if r.get("phase") is not None]
    if not keys and not phases:
        return None
    fig = Figure(figsize=(7.0, 5.4 if schedules else 3.6), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2 if schedules else 1, 1, sharex=True, height_ratios=[2, 1] if schedules else None)
    axes = list(axes) if schedules else [axes]
    ax = axes[0]
    ax.set_title("curriculum: loss weights by step")
    ax.set_ylabel("weight")
    for k in keys:
        steps, values = _series(train, lambda r, k=k: r.get(k))
        ax.plot(steps, values, label=k.removeprefix("weight_"))
    if schedules:
        for k in schedules:
            steps, values = _series(train, lambda r, k=k: r.get(k))
            axes[1].plot(steps, values, label=k.replace("_", "-"), drawstyle="steps-post")
        axes[1].set_ylabel("value")
        axes[1].legend(loc="best", fontsize="small")
    axes[-1].set_xlabel("optimizer step")
    for a in axes:
        a.grid(True, alpha=0.3)
        _mark_resumes(a, run)
    _shade_phases(ax, phases)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize="small")
    return _save(fig, path)


def _shade_phases(ax, phases: list[tuple[int, Any]]) -> None:
    """Shade each phase's span of steps and name it, whether phases are numbers or names."""
    spans, start = [], 0
    for i in range(1, len(phases) + 1):
        if i == len(phases) or phases[i][1] != phases[start][1]:
            spans.append((phases[start][0], phases[i - 1][0], phases[start][1]))
            start = i
    for j, (first, last, name) in enumerate(spans):
        end = spans[j + 1][0] if j + 1 < len(spans) else last
        ax.axvspan(first, end, color=f"C{j % 10}", alpha=0.08)
        ax.annotate(
            f"phase {name}", (first, 0.01), xycoords=("data", "axes fraction"), va="bottom", fontsize="small"
        )


def _final_bars(run: RunFolder) -> dict[str, float]:
    bars: dict[str, float] = {}
    final_eval = (run.summary or {}).get("eval") or {}
    for kind, label in (("raw", "student (raw)"), ("ema", "student (EMA)")):
        value = (final_eval.get(kind) or {}).get("bits_per_byte")
        if isinstance(value, (int, float)):
            bars[label] = float(value)
    result = run.eval_result or {}
    for role in ("student", "teacher"):
        value = (result.get(role) or {}).get("bits_per_byte")
        if isinstance(value, (int, float)):
            bars[f"{role} (sakd eval)"] = float(value)
    return bars


def plot_final(run: RunFolder, path: Path) -> Path | None:
    """Bars of the final held-out bits per byte (summary.json) and of `sakd eval` (eval.json): student raw
    and EMA weights, and teacher vs student; plus their parameter counts when eval.json has them."""
    bars = _final_bars(run)
    if not bars:
        return None
    result = run.eval_result or {}
    params = {r: result[r]["parameters"] for r in ("student", "teacher") if "parameters" in result.get(r, {})}
    fig = Figure(figsize=(7.0 if not params else 9.5, 3.6), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2 if params else 1, width_ratios=[2, 1] if params else None, squeeze=False)[0]
    ax = axes[0]
    names = list(bars)
    colors = ["tab:orange" if "teacher" in n else "tab:blue" for n in names]
    drawn = ax.bar(range(len(names)), [bars[n] for n in names], color=colors)
    ax.bar_label(drawn, fmt="%.3f", fontsize="small")
    ax.set_xticks(range(len(names)), names, rotation=15, fontsize="small")
    ax.set_ylabel("bits per byte (lower is better)")
    ax.set_title("final held-out bits per byte")
    if params:
        ax2 = axes[1]
        drawn = ax2.bar(list(params), list(params.values()), color=["tab:blue", "tab:orange"][: len(params)])
        ax2.bar_label(drawn, labels=[f"{v:,}" for v in params.values()], fontsize="small")
        ax2.set_title("parameters")
    return _save(fig, path)


PLOTS: dict[str, Callable[[RunFolder, Path], Path | None]] = {
    "loss": plot_losses,
    "lr": plot_lr,
    "grad_norm": plot_grad_norm,
    "eval_bpb": plot_eval,
    "skipped_steps": plot_skips,
    "curriculum": plot_curriculum,
    "final": plot_final,
}


def write_plots(run: RunFolder, out_dir: Path) -> dict[str, Path]:
    """Every plot the run has data for, as out_dir/<name>.png; returns {name: path}."""
    written = {}
    for name, plot in PLOTS.items():
        path = plot(run, out_dir / f"{name}.png")
        if path is not None:
            written[name] = path
    return written
