"""`sakd report` on a run stopped by SIGTERM in the real CLI and resumed with --resume auto."""

from __future__ import annotations

import signal
from pathlib import Path

from helpers import CLIRun, metrics_records, write_yaml
from report_helpers import assert_plot_has_data, report_sections, small_run_config

from sakd.cli import main
from sakd.report import build_report


def test_report_of_a_run_stopped_by_sigterm_and_resumed(base_config, assets, tmp_path):
    """The real CLI in a subprocess, stopped with SIGTERM once its first checkpoint exists, then resumed with
    --resume auto: the report names the resumed segment."""
    raw = small_run_config(base_config, assets, max_steps=6, save_every=2)
    run = Path(raw["output_dir"])
    config = write_yaml(raw, tmp_path / "config.yaml")
    first = CLIRun("train", str(config), logs=tmp_path / "first")
    try:
        first.wait_for(run / "checkpoints" / "step-000002" / "manifest.json", timeout=120)
        first.signal(signal.SIGTERM)
        assert first.wait(120) == 128 + signal.SIGTERM, first.stderr
    finally:
        if first.proc.poll() is None:
            first.proc.kill()
            first.proc.wait()
    assert main(["train", str(config), "--resume", "auto"]) == 0

    (resume,) = metrics_records(run, "resume")
    assert 2 <= resume["step"] < 6
    paths = build_report(run)
    assert paths["markdown"] == run / "report.md" and paths["html"] == run / "report.html"
    sections = report_sections(paths["markdown"].read_text())
    assert f"segment 2: resumed at step {resume['step']} from {resume['from']}" in sections["Timeline"]
    assert "ended at step 6 (max_steps)" in sections["Timeline"]
    assert f"resumed segment 2: the run was resumed at step {resume['step']}" in sections["Warnings"]
    assert "resumed segment 2" in paths["html"].read_text()
    for name in ("loss", "lr", "grad_norm", "eval_bpb", "final"):
        assert_plot_has_data(paths[name])
