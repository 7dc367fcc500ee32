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
    assert set(result["targets"]) == {*RATIOS, "cache_epoch_speedup", "cache_epoch_bpb_difference"}
    assert result["cache_epoch_speedup"] is None and result["targets"]["cache_epoch_speedup"]["met"] is None

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


def test_bench_cache_epoch_trains_a_demo_epoch_live_and_cached(tmp_path, monkeypatch, capsys) -> None:
    """Part (d) on a demo shrunk to seconds: one epoch live and one from the cache, same steps, and both
    students evaluated."""
    from sakd.tools import demo

    tiny = demo.DemoSize(0.03, 0.01, 32, 20, 20, 4, 32, 1, 16, 1, 8)  # 20 steps: the demo warms up 20
    monkeypatch.setattr(demo, "QUICK", tiny)
    out = tmp_path / "bench.json"
    args = ["bench", "--quick", "--cache-epoch", "quick", "--workdir", str(tmp_path / "demo"), "--output"]
    assert main([*args, str(out)]) == 0
    result = json.loads(out.read_text())
    epoch = result["cache_epoch"]
    assert epoch["steps"] == epoch["windows"] // tiny.batch_size > 1
    assert epoch["coverage"] == 1.0 and 0 < epoch["top_k_mass"] < 1
    assert len(epoch["live_s"]) == len(epoch["cached_s"]) == 1
    assert math.isfinite(epoch["live_bpb"]) and math.isfinite(epoch["cached_bpb"])
    assert epoch["live_bpb"] != epoch["cached_bpb"]  # one ran the teacher, the other read its top-16
    assert result["cache_epoch_speedup"] == epoch["speedup"] > 0
    assert result["cache_epoch_bpb_difference"] == epoch["bpb_relative_difference"]
    assert epoch["teacher_to_student_parameters"] > 1
    assert result["targets"]["cache_epoch_bpb_difference"]["target"] == "abs<= 0.01"
    runs = tmp_path / "demo" / "quick" / "cache-epoch"
    assert {p.name for p in runs.iterdir()} >= {"live-0", "cached-0", "teacher-cache"}
    assert "(d) one epoch of the quick demo" in capsys.readouterr().out
    # measured again in the same folder: the earlier runs are replaced, the cache is reused as it is
    shards = {p: p.stat().st_mtime_ns for p in (runs / "teacher-cache").glob("shard-*")}
    assert main([*args, str(out)]) == 0
    assert shards and {p: p.stat().st_mtime_ns for p in shards} == shards
