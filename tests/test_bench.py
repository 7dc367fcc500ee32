"""`sakd bench --quick` through the real CLI: every number is there and plausible. No timing assertions (the
machines running the tests are shared and noisy); memory is deterministic enough to compare."""

from __future__ import annotations

import json
import math

from sakd.cli import main

RATIOS = [
    "loss_memory_ratio",
    "loss_time_ratio",
    "step_speed_ratio_same_vocab",
    "step_speed_ratio_cross_vocab",
    "data_to_train_ratio",
    "cache_speedup",
]


def test_bench_quick_writes_every_number(tmp_path, capsys) -> None:
    out = tmp_path / "bench.json"
    assert main(["bench", "--quick", "--device", "cpu", "--output", str(out)]) == 0
    result = json.loads(out.read_text())

    for key in RATIOS:
        assert isinstance(result[key], float) and math.isfinite(result[key]) and result[key] > 0, key
    assert result["device"].startswith("cpu")

    rows = {(r["vocab"], r["variant"]): r for r in result["loss"]["results"]}
    largest = max(v for v, _ in rows)
    assert result["loss_ratio_vocab"] == largest
    chunked, full = rows[largest, "chunked"], rows[largest, "full"]
    assert chunked["status"] == full["status"] == "ok"
    assert 0 < chunked["peak_mb"] < full["peak_mb"]
    assert all(t > 0 for t in chunked["times_s"] + full["times_s"])
    # The memory method measures a known allocation within a few percent.
    calibration = result["loss"]["calibration"]
    assert abs(calibration["measured_mb"] - calibration["allocated_mb"]) < 0.1 * calibration["allocated_mb"]

    for pair in ("same_vocab", "cross_vocab"):
        step = result["step"][pair]
        assert step["sakd"]["tokens_per_s"] > 0 and step["reference"]["tokens_per_s"] > 0
        assert step["sakd_cached"]["tokens_per_s"] > 0
        assert step["cache"]["coverage"] == 1.0  # every aligned position of the timed batches was cached
    assert result["step"]["same_vocab"]["teacher_vocab"] == result["step"]["same_vocab"]["student_vocab"]
    assert result["step"]["cross_vocab"]["teacher_vocab"] != result["step"]["cross_vocab"]["student_vocab"]
    assert result["data"]["windows"] > 0 and result["data"]["tokens_per_s"] > 0
    assert set(result["targets"]) == set(RATIOS)

    table = capsys.readouterr().out
    assert "loss_memory_ratio" in table and "cache_speedup" in table


def test_bench_rejects_bad_sizes(capsys) -> None:
    assert main(["bench", "--quick", "--tokens", "0"]) == 2
    assert "--tokens 0" in capsys.readouterr().err


def test_bench_leaves_the_thread_count_as_it_found_it(tmp_path):
    """Training in the same process after a bench must run as before (bit-exact resume depends on it)."""
    import torch

    from sakd.cli import main

    before = torch.get_num_threads()
    assert main(["bench", "--quick", "--output", str(tmp_path / "b.json")]) == 0
    assert torch.get_num_threads() == before
