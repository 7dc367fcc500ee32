"""`final/`: the trained student as a Hugging Face folder."""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from sakd.models.load import unwrap
from sakd.models.lora import save_pretrained_student
from sakd.train.sharding import gather_full_weights, is_sharded


def export_final(out: Path, student, ema, tokenizer, final_eval, accelerator) -> dict[str, Any]:
    """`final/`: the student as a Hugging Face folder, with the better of raw and EMA weights on held-out bits
    per byte (raw when there is no held-out data), and `sakd.json` saying which."""
    choice = final_eval["best"] if final_eval else "raw"
    info = {"weights": choice, "bits_per_byte": final_eval["best_bits_per_byte"] if final_eval else None}
    model = unwrap(student)
    sharded = is_sharded(model)
    context = ema.applied(model) if choice == "ema" and ema is not None else nullcontext()
    with context:
        weights = gather_full_weights(model) if sharded else None  # a collective
        if accelerator.is_main_process:
            final = out / "final"
            save_pretrained_student(model, final, dict(weights) if sharded else None)
    if accelerator.is_main_process:
        tokenizer.save_pretrained(final)
        (final / "sakd.json").write_text(json.dumps(info, indent=1))
    accelerator.wait_for_everyone()
    return info
