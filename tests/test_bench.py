"""`sakd bench --quick` through the real CLI: every number is there and plausible. No timing assertions (the
machines running the tests are shared and noisy); memory is deterministic enough to compare."""

from __future__ import annotations

import json
import math

import pytest

from sakd.cli import main

RATIOS = [
    "loss_memory_ratio",
    "loss_time_ratio",
    "step_speed_ratio_same_vocab",
    "step_speed_ratio_cross_vocab",
    "data_to_train_ratio",
    "cache_speedup",
]
TRL_KEYS = ["vs_trl_speed_ratio", "vs_trl_memory_ratio", "vs_trl_speed_ratio_32k", "vs_trl_memory_ratio_32k"]


@pytest.mark.slow  # every part, TRL's steps each in their own process
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
    assert set(result["targets"]) == {
        *RATIOS,
        "cache_epoch_speedup",
        "cache_epoch_bpb_difference",
        "cache_efficiency",
        *TRL_KEYS,
        "plan_error",
    }
    cross = result["step"]["cross_vocab"]
    assert 0 < cross["teacher_forward_s"] < cross["live_step_s"]
    assert result["cache_ideal_speedup"] == cross["live_step_s"] / (
        cross["live_step_s"] - cross["teacher_forward_s"]
    )
    assert result["cache_efficiency"] == result["cache_speedup"] / result["cache_ideal_speedup"]
    assert result["plan_error"] is None and "seed_scale" not in result  # only with --seed-scale
    if result["trl_version"] is not None:  # part (e) ran at the quick sizes
        assert all(isinstance(result[key], float) for key in TRL_KEYS if "speed" in key)
        assert set(result["trl"]["results"]) == {"256", "512"}
        gold = result["trl"]["gold"]
        assert gold["teacher_vocab"] == 256 and gold["student_vocab"] == 258  # the BPE's bytes and specials
        assert result["vs_trl_gold_speed_ratio"] == gold["speed_ratio"] > 0
        assert gold["sakd"]["weights_changed"] and gold["gold"]["weights_changed"]
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
    assert main(["bench", "--quick", "--no-trl", "--output", str(tmp_path / "b.json")]) == 0
    assert torch.get_num_threads() == before


def test_bench_runs_the_chunk_likelihood_term_on_request_in_the_live_step_only(tmp_path):
    """The plain-KD comparison turns the term off; --set turns it on for the live step, while the cached step,
    which has no per-token teacher log-probabilities, runs without it instead of stopping."""
    import json

    from sakd.cli import main

    out = tmp_path / "b.json"
    args = ["bench", "--quick", "--no-trl", "--output", str(out)]
    assert main([*args, "--set", "distill.chunk_likelihood_weight=1"]) == 0
    step = json.loads(out.read_text())["step"]
    assert step["cross_vocab"]["sakd_setup"]["objective"].endswith("+ chunk likelihood")
    assert main(args) == 0
    assert (
        "chunk likelihood"
        not in json.loads(out.read_text())["step"]["cross_vocab"]["sakd_setup"]["objective"]
    )


@pytest.mark.slow  # two live and two cached training runs
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


def test_teacher_timer_and_cache_efficiency_against_plain_arithmetic() -> None:
    import torch

    from sakd.tools.cache_speed import TeacherTimer, cache_efficiency

    teacher = torch.nn.Linear(4, 4)
    timer = TeacherTimer(teacher, torch.device("cpu"))
    for _ in range(6):
        teacher(torch.ones(2, 4))
    timer.close()
    teacher(torch.ones(2, 4))  # after close: not timed
    assert len(timer.seconds) == 6 and all(s > 0 for s in timer.seconds)
    assert timer.per_step(2, 2) == [sum(timer.seconds[2:4]), sum(timer.seconds[4:6])]

    rates = {
        "sakd": {"step_s": [0.9, 1.0, 1.2], "tokens_per_s": 100.0},
        "sakd_cached": {"tokens_per_s": 180.0},
    }
    out = cache_efficiency(rates, [0.4, 0.5, 0.7])
    assert out["cache_ideal_speedup"] == 1.0 / (1.0 - 0.5)  # medians: a step of 1 s, half of it the teacher
    assert abs(out["cache_efficiency"] - 1.8 / 2.0) < 1e-12
    assert cache_efficiency(rates, [])["cache_ideal_speedup"] is None


@pytest.mark.slow  # each side in its own process
def test_trl_part_trains_both_sides_on_the_same_batches(tmp_path) -> None:
    """Part (e) at tiny sizes: both divergences, sakd and TRL's two steps each measured in their own process,
    all trained."""
    pytest.importorskip("trl")
    from sakd.tools.bench_pairs import TrlSizes
    from sakd.tools.bench_trl import DIVERGENCES, headline, run_trl_bench

    sizes = TrlSizes(
        (300,),
        batch_size=2,
        max_length=16,
        teacher_hidden=32,
        student_hidden=16,
        layers=1,
        warmup_steps=1,
        steps=2,
    )
    trl = run_trl_bench(tmp_path, sizes, threads=1)
    assert trl["trl_version"]
    rows = trl["results"]["300"]
    assert set(rows) == set(DIVERGENCES)
    for row in rows.values():
        for side in ("sakd", "trl", "trl_chunked"):
            assert "error" not in row[side], row[side]
            assert row[side]["weights_changed"] and row[side]["tokens_per_s"] > 0
            assert row[side]["peak_mb"] >= 0 and len(row[side]["step_tokens_per_s"]) == 2
        fastest = max(row["trl"]["tokens_per_s"], row["trl_chunked"]["tokens_per_s"])
        assert row["speed_ratio"] == row["sakd"]["tokens_per_s"] / fastest
        assert row[row["trl_fastest"]]["tokens_per_s"] == fastest
    speed, _ = headline(trl, 300)
    assert speed is not None and speed > 0


@pytest.mark.slow  # each side in its own process
def test_gold_part_trains_both_sides_across_tokenizers(tmp_path) -> None:
    pytest.importorskip("trl")
    from sakd.tools.bench_gold import run_gold_bench
    from sakd.tools.bench_pairs import TrlSizes

    sizes = TrlSizes((600,), 2, 16, teacher_hidden=32, student_hidden=16, layers=1, warmup_steps=1, steps=2)
    row = run_gold_bench(tmp_path, sizes, 600, 300, threads=1)
    assert (row["teacher_vocab"], row["student_vocab"]) == (600, 300)
    for side in ("sakd", "gold"):
        assert "error" not in row[side], row[side]
        assert row[side]["weights_changed"] and row[side]["tokens_per_s"] > 0
    assert row["speed_ratio"] == row["sakd"]["tokens_per_s"] / row["gold"]["tokens_per_s"]


def test_trl_part_is_skipped_with_one_line_without_trl(monkeypatch, capsys) -> None:
    import torch

    from sakd.tools import bench, bench_trl

    monkeypatch.setattr(bench_trl, "trl_version", lambda: None)
    result: dict = {}
    bench._trl_part(result, {}, None, False, torch.device("cpu"))
    assert result["trl_version"] is None and result["vs_trl_speed_ratio"] is None
    assert result["trl"] == {"skipped": "trl is not installed"}
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "skipped" in err[0] and "pip install" in err[0]


def test_word_tokenizer_has_exactly_the_vocabulary_asked_for() -> None:
    from sakd.tools.bench_pairs import word_tokenizer

    tok = word_tokenizer(1000)
    assert len(tok) == 1000
    assert tok("w0 w996").input_ids == [3, 999]
