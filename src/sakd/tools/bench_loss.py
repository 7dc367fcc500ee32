"""`sakd bench` part (a): the chunked LM-head loss against the plain full-logits reference.

One pass is forward + backward of the loss training uses for a same-vocabulary pair: next-token cross-entropy
plus forward KL, the teacher logits computed from teacher hidden states inside the row loss, so neither
model's (tokens x vocabulary) logits exist in full in the chunked variant. The chunked variant is what
training runs by default (`chunked_head_loss` with the closed-form gradients of `FusedForwardKL`); the
reference is `full_head_loss` with autograd through `make_distill_row_loss`. Both get the same inputs.

Peak memory. CUDA: `torch.cuda.max_memory_allocated` above the allocation after set-up and warm-up. CPU:
each (vocabulary, variant) runs in a fresh process (a fork of a server that has only imported the code), so
that no other work and no freed-but-kept heap of an earlier variant counts; after set-up and a warm-up pass
the kernel's resident high-water mark (VmHWM) is reset through /proc/self/clear_refs, and the peak is VmHWM
after the timed passes minus the resident size at the reset. A known allocation is measured the same way
first, as a check of the method. A variant that would not fit in the available memory (predicted from the
bytes per logit measured at a smaller vocabulary) is skipped and said so, never run into the out-of-memory
killer; the measuring process also runs under an address-space limit, so that a wrong prediction ends in an
allocation error instead.
"""

from __future__ import annotations

import gc
import importlib
import multiprocessing
import os
import resource
import statistics
import time
from typing import Any

import torch

from sakd.losses import chunk_rows, chunked_head_loss, forward_kl, full_head_loss, make_distill_row_loss
from sakd.losses.fused import FusedForwardKL, same_vocab_target
from sakd.train.tracking import proc_status_bytes

VARIANTS = ("chunked", "full")
# Bytes per (row x vocabulary) fp32 logit that a variant keeps alive at its peak, used to predict whether a
# size fits before any measurement of this run exists (measured on this code: about 9.3 x 4 for the full
# variant per token, 11.3 x 4 for the chunked one per chunk row); measured values replace them.
DEFAULT_BYTES_PER_LOGIT = {"full": 12 * 4, "chunked": 14 * 4}
FIT_FRACTION = 0.95  # a variant runs only if its predicted peak is below this share of the available memory
WARMUP_ROWS = 256
MIB = 2**20


def _problem(rows: int, hidden: int, vocab: int, device: torch.device, seed: int = 0):
    """Student hidden (rows, H) and head (V, H) with gradients; teacher hidden (rows, H) and head (V, H)."""
    g = torch.Generator().manual_seed(seed)
    student_hidden = torch.randn(rows, hidden, generator=g).to(device).requires_grad_()
    student_head = (torch.randn(vocab, hidden, generator=g) * hidden**-0.5).to(device).requires_grad_()
    teacher_hidden = torch.randn(rows, hidden, generator=g).to(device)
    teacher_head = (torch.randn(vocab, hidden, generator=g) * hidden**-0.5).to(device)
    labels = torch.randint(0, vocab, (rows,), generator=g).to(device)
    kd_mask = torch.ones(rows, dtype=torch.bool, device=device)
    kd_weight = torch.ones(rows, device=device)
    row_loss = make_distill_row_loss(_forward_kl_rows, teacher_head)  # the plain reference's
    fused = FusedForwardKL(row_loss, same_vocab_target(vocab), teacher_head, None, 1.0)
    row_inputs = [labels, teacher_hidden, kd_mask, kd_weight]
    part_weights = {"lm": 1.0 / rows, "kd": 1.0 / rows}
    return student_hidden, student_head, (row_loss, fused), row_inputs, part_weights


def _forward_kl_rows(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Same-vocabulary forward KL at temperature 1, as `DistillObjective` computes it. (n, V) x2 -> (n,)."""
    return forward_kl(student_logits, torch.log_softmax(teacher_logits.float(), dim=-1), 1.0)


def _one_pass(variant: str, problem, chunk_size: int) -> None:
    hidden, weight, (row_loss, fused), row_inputs, part_weights = problem
    if variant == "chunked":
        total, _ = chunked_head_loss(hidden, weight, fused, row_inputs, part_weights, chunk_size)
    else:
        total, _ = full_head_loss(hidden, weight, row_loss, row_inputs, part_weights)
    total.backward()
    hidden.grad = weight.grad = None


class _CpuPeak:
    """Resident-memory peak of this process from now on (see the module docstring)."""

    def __init__(self):
        gc.collect()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current resident size
            self.method = "VmHWM reset"
        except OSError:
            self.method = "ru_maxrss (not resettable: a set-up peak above the baseline hides growth)"
        self.baseline = proc_status_bytes("VmRSS") or 0

    def peak(self) -> int:
        if self.method == "VmHWM reset":
            high = proc_status_bytes("VmHWM") or 0
        else:
            scale = 1 if os.uname().sysname == "Darwin" else 1024  # bytes on macOS, KiB on Linux
            high = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
        return max(high - self.baseline, 0)


def _timed_passes(variant: str, problem, chunk_size: int, repeats: int, budget_s: float, sync) -> list[float]:
    """At least one timed pass; more up to `repeats` while the time spent stays within `budget_s`."""
    times: list[float] = []
    while len(times) < repeats and (not times or sum(times) + statistics.median(times) <= budget_s):
        sync()
        start = time.perf_counter()
        _one_pass(variant, problem, chunk_size)
        sync()
        times.append(time.perf_counter() - start)
    return times


def measure_variant(spec: dict[str, Any]) -> dict[str, Any]:
    """Time and peak memory of one variant at one size; `spec` holds variant, vocab, tokens, hidden,
    chunk_size, repeats, budget_s, device. Returns {times_s, median_s, min_s, peak_mb, memory_method}."""
    device = torch.device(spec["device"])
    variant, chunk_size = spec["variant"], spec["chunk_size"]
    cuda = device.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    # Kernels, thread pools and library buffers are set up by a small pass before anything is measured.
    _one_pass(
        variant, _problem(min(WARMUP_ROWS, spec["tokens"]), spec["hidden"], spec["vocab"], device), chunk_size
    )
    problem = _problem(spec["tokens"], spec["hidden"], spec["vocab"], device)
    if cuda:
        sync()
        baseline = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        method = "torch.cuda.max_memory_allocated"
    else:
        cpu_peak = _CpuPeak()
        method = cpu_peak.method
    times = _timed_passes(variant, problem, chunk_size, spec["repeats"], spec["budget_s"], sync)
    peak = torch.cuda.max_memory_allocated(device) - baseline if cuda else cpu_peak.peak()
    return {
        "times_s": [round(t, 4) for t in times],
        "median_s": statistics.median(times),
        "min_s": min(times),
        "peak_mb": peak / MIB,
        "memory_method": method,
    }


def _known_allocation(spec: dict[str, Any]) -> dict[str, Any]:
    """The method check: the measured peak of one allocation of known size."""
    cpu_peak = _CpuPeak()
    block = torch.ones(spec["calibration_mb"] * MIB // 4)
    del block
    return {"peak_mb": cpu_peak.peak() / MIB, "memory_method": cpu_peak.method}


def _child(target: str, spec: dict[str, Any], conn) -> None:
    if spec["threads"]:  # 0: torch's own choice
        torch.set_num_threads(spec["threads"])
    if spec.get("address_space_limit"):
        vm = proc_status_bytes("VmSize") or 0
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        limit = vm + spec["address_space_limit"]
        if hard == resource.RLIM_INFINITY or limit < hard:
            resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        if ":" in target:  # another bench part's measure, "module:function"
            module, name = target.split(":")
            function = getattr(importlib.import_module(module), name)
        else:
            function = {"measure": measure_variant, "calibrate": _known_allocation}[target]
        result = function(spec)
    except Exception as e:  # e.g. an allocation above the address-space limit: report it, do not hang
        result = {"error": f"{type(e).__name__}: " + " ".join(str(e).split())[:200]}
    conn.send(result)
    conn.close()


def _context():
    """A fork server that has imported torch and this module starts each measuring process as a clean fork
    (no tensors, no freed heap), in milliseconds instead of a fresh interpreter's seconds; spawn elsewhere."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])
    return ctx


def in_fresh_process(target: str, spec: dict[str, Any]) -> dict[str, Any]:
    """`target(spec)` in a clean fork: "measure", "calibrate" or "module:function"; errors come back as
    {"error": ...}."""
    ctx = _context()
    receive, send = ctx.Pipe(duplex=False)
    process = ctx.Process(target=_child, args=(target, spec, send), daemon=True)
    process.start()
    send.close()
    try:
        result = receive.recv()
    except EOFError:
        result = {"error": "the measuring process died"}
    process.join()
    if process.exitcode not in (0, None) and "error" not in result:
        result["error"] = f"the measuring process exited with status {process.exitcode}"
    return result


def available_memory(device: torch.device) -> int:
    """Bytes that a new allocation can use now: free GPU memory, or MemAvailable of the machine."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 2**62  # unknown: rely on the address-space limit


def run_loss_bench(
    tokens: int,
    hidden: int,
    vocabs: list[int],
    chunk_size: int,
    repeats: int,
    budget_s: float,
    device: torch.device,
    chunk_logits: int | None = None,
) -> dict[str, Any]:
    """Both variants at every vocabulary (ascending). Returns {method, calibration, results: [row per
    (vocab, variant)]}; a row has status "ok" (times_s, median_s, peak_mb), "skipped" or "failed" (note)."""
    cuda = device.type == "cuda"
    threads = torch.get_num_threads()
    bytes_per_logit = dict(DEFAULT_BYTES_PER_LOGIT)
    calibration = None
    if not cuda:
        calibration_mb = 256
        check = in_fresh_process("calibrate", {"threads": threads, "calibration_mb": calibration_mb})
        calibration = {"allocated_mb": calibration_mb, "measured_mb": check.get("peak_mb"), **check}
    results = []
    for vocab in sorted(vocabs):
        rows = chunk_rows(chunk_size, chunk_logits, vocab, hidden)  # as training chunks this head
        for variant in VARIANTS:
            rows_alive = tokens if variant == "full" else min(rows, tokens)
            predicted = bytes_per_logit[variant] * rows_alive * vocab
            available = available_memory(device)
            row: dict[str, Any] = {
                "vocab": vocab,
                "variant": variant,
                "tokens": tokens,
                "hidden": hidden,
                "chunk_size": rows if variant == "chunked" else None,
                "predicted_peak_mb": round(predicted / MIB, 1),
            }
            if predicted > FIT_FRACTION * available:
                row.update(
                    status="skipped",
                    note=f"predicted peak {predicted / 2**30:.1f} GiB > {FIT_FRACTION:.0%} of the "
                    f"{available / 2**30:.1f} GiB available: not run",
                )
                results.append(row)
                continue
            spec = {
                "variant": variant,
                "vocab": vocab,
                "tokens": tokens,
                "hidden": hidden,
                "chunk_size": rows,
                "repeats": repeats,
                "budget_s": budget_s,
                "device": str(device),
                "threads": threads,
                "address_space_limit": int(0.97 * available),
            }
            if cuda:
                try:
                    measured = measure_variant(spec)
                except torch.cuda.OutOfMemoryError as e:
                    measured = {"error": "out of memory: " + " ".join(str(e).split())[:160]}
                gc.collect()
                torch.cuda.empty_cache()
            else:
                measured = in_fresh_process("measure", spec)
            if "error" in measured:
                row.update(status="failed", note=measured["error"])
            else:
                row.update(status="ok", **measured)
                bytes_per_logit[variant] = measured["peak_mb"] * MIB / (rows_alive * vocab)
            results.append(row)
    method = (
        "CUDA: torch.cuda.max_memory_allocated above the allocation after set-up"
        if cuda
        else "CPU: each variant in a fresh process (forked from a server that only imported the code); "
        "peak = resident high-water mark (VmHWM, reset through /proc/self/clear_refs after set-up and "
        "warm-up) minus the resident size at the reset"
    )
    return {"method": method, "calibration": calibration, "results": results}


def loss_ratios(results: list[dict[str, Any]]) -> dict[int, dict[str, float | None]]:
    """{vocab: {memory_ratio, time_ratio}} (chunked / full), None where a variant has no measurement."""
    by_key = {(r["vocab"], r["variant"]): r for r in results}
    ratios: dict[int, dict[str, float | None]] = {}
    for vocab in sorted({r["vocab"] for r in results}):
        chunked, full = by_key.get((vocab, "chunked")), by_key.get((vocab, "full"))
        ok = chunked and full and chunked["status"] == "ok" and full["status"] == "ok"
        ratios[vocab] = {
            "memory_ratio": chunked["peak_mb"] / full["peak_mb"] if ok and full["peak_mb"] > 0 else None,
            "time_ratio": chunked["median_s"] / full["median_s"] if ok and full["median_s"] > 0 else None,
        }
    return ratios
