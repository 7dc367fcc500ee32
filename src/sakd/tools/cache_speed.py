"""What the teacher cache buys: live vs cached training of one config, same steps, same data order."""

from __future__ import annotations

import copy
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

from sakd.cache.capture import capture_teacher_cache
from sakd.config import validate


def _bits_per_byte(summary: dict[str, Any]) -> float | None:
    evaluation = summary.get("eval")
    return evaluation["raw"]["bits_per_byte"] if evaluation else None


def measure_cache_speedup(
    raw_config: dict[str, Any],
    workdir: str | Path,
    top_k: int = 64,
    steps: int | None = None,
    repeats: int = 1,
    probs_dtype: str = "float16",
) -> dict[str, Any]:
    """Train `raw_config` (a raw config mapping with a teacher and held-out data) live and from its teacher
    cache, `repeats` times each (alternating, so that machine noise hits both), for `steps` optimizer steps
    (default: one epoch of the training windows). Everything is written under `workdir`; its run folders
    from an earlier measurement are replaced, its teacher cache is reused.

    Returns {"steps", "windows", "top_k", "top_k_mass" (the teacher's mean probability inside the top-k),
    "capture_s" (the one-time teacher pass), "live_s", "cached_s" (loop
    seconds per run: the training steps only, not loading, tokenization, evaluation or export), "speedup"
    (median live / median cached), "speedup_range" (slowest and fastest pairing), "live_bpb", "cached_bpb"
    (held-out bits per byte of the raw weights after the steps, first run of each), "bpb_relative_difference"
    ((cached - live) / live), "coverage" (the cache's coverage of the student's aligned positions)}.
    """
    work = Path(workdir)
    base = copy.deepcopy(raw_config)
    base.setdefault("train", {}).update(progress=False, tensorboard=False, eval_every=0, save_every=0)
    base["teacher"].pop("cache", None)
    # a cache holds no per-token log-probabilities, so both sides train without the chunk-likelihood term;
    # and it keeps every distillation row it captured, so the live side does too
    base.setdefault("distill", {}).update(chunk_likelihood_weight=0.0, projection_rows="all")
    cache_dir = work / "teacher-cache"
    base["output_dir"] = str(work / "capture")
    capture = capture_teacher_cache(
        validate(base), top_k=top_k, path=cache_dir, probs_dtype=probs_dtype, progress=False
    )
    if steps is None:
        per_step = base["train"].get("batch_size", 8) * base["train"].get("grad_accum", 1)
        steps = max(capture["windows"] // per_step, 1)
    base["train"]["max_steps"] = steps
    base["train"]["warmup_steps"] = min(base["train"].get("warmup_steps", 0), steps)

    from sakd.train.loop import train  # the loop imports this package

    runs: dict[str, list[dict[str, Any]]] = {"live": [], "cached": []}
    for r in range(repeats):
        for mode in ("live", "cached"):
            raw = copy.deepcopy(base)
            raw["output_dir"] = str(work / f"{mode}-{r}")
            shutil.rmtree(raw["output_dir"], ignore_errors=True)  # a run of an earlier measurement
            if mode == "cached":
                raw["teacher"]["cache"] = str(cache_dir)
            t0 = time.perf_counter()
            summary = train(validate(raw))
            summary["wall_s"] = time.perf_counter() - t0
            runs[mode].append(summary)
    live = [s["elapsed_s"] for s in runs["live"]]
    cached = [s["elapsed_s"] for s in runs["cached"]]
    live_bpb, cached_bpb = _bits_per_byte(runs["live"][0]), _bits_per_byte(runs["cached"][0])
    return {
        "steps": steps,
        "windows": capture["windows"],
        "top_k": capture["top_k"],
        "top_k_mass": capture["top_k_mass"],
        "capture_s": capture["seconds"],
        "live_s": live,
        "cached_s": cached,
        "live_wall_s": [round(s["wall_s"], 2) for s in runs["live"]],
        "cached_wall_s": [round(s["wall_s"], 2) for s in runs["cached"]],
        "speedup": statistics.median(live) / statistics.median(cached),
        "speedup_range": [min(live) / max(cached), max(live) / min(cached)],
        "live_bpb": live_bpb,
        "cached_bpb": cached_bpb,
        "bpb_relative_difference": (cached_bpb - live_bpb) / live_bpb if live_bpb and cached_bpb else None,
        "coverage": runs["cached"][0]["teacher_cache"]["coverage"],
    }


def demo_cache_epoch(
    workdir: str | Path, quick: bool = True, repeats: int = 1, top_k: int = 64
) -> dict[str, Any]:
    """`measure_cache_speedup` over one epoch of the demo's data, with its MoE teacher and student (`sakd demo`
    sizes; the teacher is pretrained once in `workdir` and reused, as the demo does)."""
    from sakd.tools.demo import prepare
    from sakd.tools.plan_memory import estimate

    setup = prepare(workdir, quick)
    raw = setup.student_config()
    raw["train"].pop("max_steps")
    work = setup.work / "cache-epoch"
    result = measure_cache_speedup(raw, work, top_k=top_k, repeats=repeats)
    plan = estimate(validate({**raw, "output_dir": str(work)}), "fp32")
    result["setup"] = "quick demo" if quick else "full demo"
    result["teacher_to_student_parameters"] = plan.teacher.params / plan.student.params
    return result


class TeacherTimer:
    """Seconds of every forward of `teacher` (a pre- and a post-forward hook), to tell how much of a live step
    the teacher takes; on CUDA the hooks synchronize, so that the time is the device's."""

    def __init__(self, teacher, device):
        import torch

        self.seconds: list[float] = []
        self._start = 0.0

        def sync() -> None:
            if device.type == "cuda":
                torch.cuda.synchronize(device)

        def before(*_):
            sync()
            self._start = time.perf_counter()

        def after(*_):
            sync()
            self.seconds.append(time.perf_counter() - self._start)

        self._handles = [teacher.register_forward_pre_hook(before), teacher.register_forward_hook(after)]

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()

    def per_step(self, steps: int, grad_accum: int) -> list[float]:
        """Teacher seconds of each of the last `steps` optimizer steps (`grad_accum` forwards each)."""
        last = self.seconds[-steps * grad_accum :]
        return [sum(last[i : i + grad_accum]) for i in range(0, len(last), grad_accum)]


def cache_efficiency(rates: dict[str, dict[str, Any]], teacher_s: list[float]) -> dict[str, float | None]:
    """How close the cached step comes to a live step without its teacher forward. `rates`: the bench's
    per-runner timings ("sakd" live, "sakd_cached"), `teacher_s`: the live steps' teacher seconds.

    cache_ideal_speedup = live step time / (live step time - teacher forward time): what a cache that costs
    nothing to read would give; cache_efficiency = measured cache_speedup / cache_ideal_speedup."""
    live = statistics.median(rates["sakd"]["step_s"])
    teacher = statistics.median(teacher_s) if teacher_s else None
    if teacher is None or teacher >= live:
        return {"live_step_s": live, "teacher_forward_s": teacher, "cache_ideal_speedup": None}
    ideal = live / (live - teacher)
    speedup = rates["sakd_cached"]["tokens_per_s"] / rates["sakd"]["tokens_per_s"]
    return {
        "live_step_s": live,
        "teacher_forward_s": teacher,
        "teacher_share_of_live_step": teacher / live,
        "cache_ideal_speedup": ideal,
        "cache_efficiency": speedup / ideal,
    }
