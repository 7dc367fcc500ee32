"""`sakd plan`'s command-line side: device memory as the user writes it, and the plan as lines of text.
The estimate itself is `sakd.tools.plan_memory.estimate`."""

from __future__ import annotations

import re

from sakd.errors import UserError
from sakd.tools.plan_memory import GIB, HEADROOM, Plan, size_text

_UNITS = {"": GIB, "b": 1, "k": 1024, "m": 1024**2, "g": GIB, "t": 1024**4}


def parse_size(text: str) -> int:
    """'16GB', '16 GiB', '12000MB', '16' (GiB) -> bytes. Units are binary (GB = GiB), as GPUs are sold."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b)?\s*", text.lower())
    if m is None or (m.group(2) == "" and m.group(3) not in (None, "b")):
        raise UserError(f"device memory '{text}' is not a size: write e.g. 16GB, 16GiB or 12000MB")
    unit = m.group(2) if m.group(2) or m.group(3) is None else "b"
    return int(float(m.group(1)) * _UNITS[unit])


def format_plan(plan: Plan, config_path: str) -> str:
    precision = "auto, counted as 16-bit as on a GPU" if plan.precision == "auto" else plan.precision
    where = "per device" if plan.device == "cuda" else "of the CPU process (peak resident size)"
    lines = [
        f"memory {where} for {config_path} ({precision}, micro-batch {plan.batch_size} x "
        f"{plan.seq_len} tokens, {plan.processes} process(es)"
        + (f", teacher.placement {plan.placement}" if plan.placement else "")
        + "):"
    ]
    width = max(len(k) for k in plan.parts)
    for name, size in plan.parts.items():
        lines.append(f"  {name:<{width}}  {size_text(size)}   {plan.formulas.get(name, '')}")
    lines.append(f"  {'total':<{width}}  {size_text(plan.total)}")
    lines.append(f"  each window of a micro-batch adds {size_text(plan.per_window).strip()} (activations)")
    if plan.device_memory is None:
        lines.append("pass --device-memory (e.g. 16GB) for a batch size that fits")
        return "\n".join(lines)
    sug = plan.suggestion
    head = f"device memory {size_text(plan.device_memory).strip()} ({int(HEADROOM * 100)}% kept free): "
    if not sug["fits"]:
        lines.append(head + sug["advice"])
        return "\n".join(lines)
    placement = (
        f"; teacher.placement: {sug['teacher_placement']} ({size_text(plan.parts['teacher weights']).strip()} "
        "of teacher weights per device)"
        if sug["teacher_placement"]
        else ""
    )
    lines.append(
        head + f"train.batch_size {sug['batch_size']}, train.grad_accum {sug['grad_accum']} "
        f"({sug['windows_per_step']} windows per process per optimizer step; the largest micro-batch that "
        f"fits is {sug['largest_batch_that_fits']}; estimated {size_text(sug['total_at_suggestion']).strip()})"
        + placement
    )
    return "\n".join(lines)
