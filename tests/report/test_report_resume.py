"""`sakd report` on a run stopped by SIGTERM in the real CLI and resumed with --resume auto."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml
from report_helpers import assert_plot_has_data, report_sections, small_run_config

from sakd.cli import main
from sakd.report import build_report


def test_report_of_a_run_stopped_by_sigterm_and_resumed(base_config, assets, tmp_path):
    """The real CLI in a subprocess, stopped with SIGTERM once its first checkpoint exists, then resumed with
    --resume auto: the report names the resumed segment."""
    raw = small_run_config(base_config, assets, max_steps=6, save_every=2)
    run = Path(raw["output_dir"])
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(raw))
    with (tmp_path / "first.err").open("w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "sakd", "train", str(config)], stdout=err, stderr=err)
    try:
        deadline = time.monotonic() + 120
        while not (run / "checkpoints" / "step-000002" / "manifest.json").exists():
            assert proc.poll() is None, (tmp_path / "first.err").read_text()
            assert time.monotonic() < deadline
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(120) == 128 + signal.SIGTERM, (tmp_path / "first.err").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert main(["train", str(config), "--resume", "auto"]) == 0

    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    (resume,) = [r for r in records if r["event"] == "resume"]
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
