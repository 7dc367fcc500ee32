"""`sakd report` on a finished run folder with an eval.json, on runs that logged skipped steps, curriculum keys
or very many steps, and on a folder that is no run; the plots are PNG files with data drawn on them.
(A run stopped by SIGTERM and resumed: test_report_resume.py.)"""

from __future__ import annotations

import base64
import json
import math
import re
import time
from pathlib import Path

import pytest
import yaml
from report_helpers import assert_plot_has_data, report_sections, small_run_config

from sakd.cli import main
from sakd.config import validate
from sakd.eval.run import EvalData, run_eval
from sakd.report import build_report
from sakd.train.loop import train


def test_report_of_a_finished_run_with_an_eval_json(base_config, assets, capsys):
    raw = small_run_config(base_config, assets, max_steps=4, eval_every=2, ema_decay=None)
    # `sakd eval`'s agreement compares every group end; so must the training's held-out KD it is checked on
    raw.setdefault("distill", {})["projection_rows"] = "all"
    summary = train(validate(raw))
    run = Path(raw["output_dir"])
    evaluated = run_eval(
        str(run / "final"),
        str(assets["teacher"]),
        EvalData([str(assets["eval"])], max_length=48, max_windows=4),
        str(run / "eval.json"),
        gen_new_tokens=1,
    )
    # The same windows, weights and forward KL on the projected teacher as the training's held-out KD loss.
    assert evaluated["agreement"]["kl"] == pytest.approx(summary["eval"]["kd"], rel=1e-4)
    assert main(["report", str(run)]) == 0
    assert str(run / "report.html") in capsys.readouterr().out

    markdown = (run / "report.md").read_text()
    sections = report_sections(markdown)
    assert list(sections) == [
        "Setup",
        "Timeline",
        "Final metrics",
        "Warnings",
        "Plots",
        "Environment",
        "Resolved config (config.yaml)",
    ]
    assert str(assets["teacher"]) in sections["Setup"] and summary["objective"] in sections["Setup"]
    assert "segment 1: started; ended at step 4 (max_steps)" in sections["Timeline"]
    assert [int(m) for m in re.findall(r"^\| (\d+) \| \d", sections["Timeline"], flags=re.M)] == [2, 4]
    assert f"| exported held-out bits per byte | {summary['final']['bits_per_byte']:.6g} |" in markdown
    assert f"{evaluated['agreement']['top1_agreement']:.6g}" in sections["Final metrics"]
    assert "None: no skipped step" in sections["Warnings"]
    assert (run / "config.yaml").read_text().strip() in sections["Resolved config (config.yaml)"]

    links = re.findall(r"!\[[^]]*\]\((plots/[^)]+)\)", markdown)
    curriculum = ["curriculum"] if "weight_kd" in (run / "metrics.jsonl").read_text() else []
    assert sorted(Path(p).stem for p in links) == sorted(
        ["eval_bpb", "final", "grad_norm", "loss", "lr", *curriculum]
    )
    for link in links:
        assert_plot_has_data(run / link)
    html = (run / "report.html").read_text()
    embedded = re.findall(r'src="data:image/png;base64,([^"]+)"', html)
    assert [base64.b64decode(e) for e in embedded] == [(run / link).read_bytes() for link in links]
    assert "<h2>Warnings</h2>" in html and "plots/" not in html


def _record(event: str, step: int, **values) -> dict:
    return {"event": event, "step": step, **values}


def test_report_warns_of_skips_a_missing_end_and_plots_the_curriculum(tmp_path):
    """A run that skipped steps (non-finite), logged curriculum weights and phases, was killed mid-line and
    never ended: every one of those shows in the warnings, and the curriculum and skips are plotted."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(
        yaml.safe_dump({"train": {"nonfinite_window": 10, "nonfinite_max_rate": 0.1}})
    )
    lines = []
    for step in range(1, 13):
        phase = 1 if step <= 6 else 2
        lines.append(
            _record(
                "train",
                step,
                lr=1e-3,
                loss=7.0 - 0.1 * step,
                loss_lm=6.0,
                loss_kd=1.0,
                grad_norm=1.0,
                weight_kd=1.0,
                weight_feature=0.0 if phase == 1 else 0.5,
                phase=phase,
            )
        )
        if step >= 9:
            lines.append(_record("skip", step, windows=[step, 40 + step], loss=math.nan, grad_norm=math.inf))
    text = "".join(json.dumps(r) + "\n" for r in lines) + '{"event": "train", "st'
    (run / "metrics.jsonl").write_text(text)

    paths = build_report(run)
    warnings = report_sections(paths["markdown"].read_text())["Warnings"]
    assert "4 step(s) skipped for a non-finite loss or gradient" in warnings
    assert "step 9: windows [9, 49] (loss nan, gradient norm inf)" in warnings
    assert "no end record: 4 of its last 10 steps were skipped" in warnings
    assert "1 unreadable line(s) in metrics.jsonl" in warnings
    for name in ("curriculum", "skipped_steps", "loss"):
        assert_plot_has_data(paths[name])
    assert "eval_bpb" not in paths and "final" not in paths


def test_report_of_a_folder_that_is_no_run_is_a_user_error(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "is not a run folder" in capsys.readouterr().err


def test_a_long_log_gives_a_short_report_quickly(tmp_path):
    """A long run must not give a report as long as its log: per-step records stay in metrics.jsonl; the
    report summarises them (evals, segments, capped warnings) and the plots thin long series."""
    run = tmp_path / "run"
    run.mkdir()
    steps = 30_000
    with (run / "metrics.jsonl").open("w") as f:
        for step in range(1, steps + 1):
            f.write(json.dumps(_record("train", step, lr=1e-3, loss=5 + 1 / step, grad_norm=1.0)) + "\n")
            if step % 1000 == 0:
                f.write(json.dumps(_record("eval", step, raw={"bits_per_byte": 2 + 1 / step})) + "\n")
        for step in range(100, 200):
            f.write(
                json.dumps(_record("skip", step, windows=[step], loss=math.nan, grad_norm=math.nan)) + "\n"
            )
    start = time.perf_counter()
    paths = build_report(run)
    assert time.perf_counter() - start < 60
    markdown = paths["markdown"].read_text()
    assert len(markdown.splitlines()) < 150 and "... and 80 more skipped steps" in markdown
    assert_plot_has_data(paths["loss"])
