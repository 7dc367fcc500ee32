"""What a checkpoint holds and how a run is saved, resumed and exported (the atomic directory mechanics are in
`checkpoint`)."""

from __future__ import annotations

import json
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from safetensors.torch import load_model as load_safetensors_model
from safetensors.torch import save_model as save_safetensors_model

from sakd.errors import UserError
from sakd.models.load import unwrap
from sakd.models.lora import load_student_weights, save_pretrained_student, save_student_weights
from sakd.train import checkpoint
from sakd.train.sharding import (
    gather_full_state,
    gather_full_weights,
    is_sharded,
    load_full_optimizer,
    load_full_weights,
    without_tied_copies,
)


def save_checkpoint(
    root, accelerator, student, heads, optimizer, scheduler, ema, loader, state, keep_last, collective=True
) -> Path:
    """Every process writes its RNG state; the main process writes the rest. Never the teacher.
    Without `collective` (an emergency save after an exception) the main process writes it alone, with its
    own RNG state only; the other processes write nothing."""
    final = root / checkpoint.step_dir_name(state.step)
    sharded = is_sharded(unwrap(student))
    if sharded and not collective:
        raise RuntimeError(
            "a sharded (FSDP) student cannot be saved by one process alone: the newest periodic checkpoint "
            "is the one to resume from"
        )
    if not collective and not accelerator.is_main_process:
        return final
    sync = accelerator.wait_for_everyone if collective else lambda: None
    sync()
    tmp = root / f".tmp-{checkpoint.step_dir_name(state.step)}"
    if accelerator.is_main_process:
        tmp = checkpoint.begin(root, state.step)
    sync()
    torch.save(checkpoint.rng_state(), tmp / f"rng-rank{accelerator.process_index}.pt")
    # Collectives first (every process): the full weights of a sharded student, and the EMA's.
    if sharded:
        weights, optimizer_state = gather_full_state(unwrap(student), optimizer)
    ema_state = ema.state_dict() if ema is not None else None
    if accelerator.is_main_process:
        if sharded:
            save_file(without_tied_copies(weights, unwrap(student)), str(tmp / "student.safetensors"))
        else:
            save_student_weights(unwrap(student), tmp / "student.safetensors")
            optimizer_state = optimizer.state_dict()
        if heads is not None:
            save_safetensors_model(heads, str(tmp / "heads.safetensors"))
        torch.save(
            {
                "optimizer": optimizer_state,
                "scheduler": scheduler.state_dict(),
                "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
                "ema": ema_state,
                # the position counts global batches: their size makes it portable
                "loader": {**loader.state_dict(), "global_batch": loader.batch_size * loader.world_size},
                "loop": asdict(state),
                "num_processes": accelerator.num_processes,
            },
            tmp / "training_state.pt",
        )
    sync()
    if accelerator.is_main_process:
        keep = max(keep_last, 1)
        final = checkpoint.commit(root, tmp, state.step, keep, {"num_processes": accelerator.num_processes})
    sync()
    return final


def load_checkpoint(path, accelerator, student, heads, optimizer, scheduler, ema, loader, state) -> None:
    # A config changed under --force may no longer fit the checkpoint: the user's to fix, not a traceback.
    sharded = is_sharded(unwrap(student))
    try:
        if sharded:  # every process reads the full weights and keeps its shards
            load_full_weights(unwrap(student), load_file(str(path / "student.safetensors")))
        else:
            load_student_weights(unwrap(student), path / "student.safetensors")
    except (RuntimeError, KeyError) as e:
        detail = " ".join(str(e).split())[:300]
        raise UserError(
            f"checkpoint '{path}' does not fit this student ({detail}): resume with the student it was trained "
            "with, or start a new run in another output_dir"
        ) from None
    if heads is not None:
        load_safetensors_model(heads, str(path / "heads.safetensors"))
    saved = checkpoint.load_state(path / "training_state.pt")
    try:
        loader.load_state_dict(saved["loader"])
    except ValueError as e:
        raise UserError(
            f"cannot resume from '{path}': {e}: restore them, or start a new run in another output_dir"
        ) from None
    if sharded:
        load_full_optimizer(unwrap(student), optimizer, saved["optimizer"])
    else:
        optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    if accelerator.scaler is not None and saved["scaler"] is not None:
        accelerator.scaler.load_state_dict(saved["scaler"])
    if ema is not None and saved["ema"] is not None:
        ema.load_state_dict(saved["ema"])
    for k, v in saved["loop"].items():
        setattr(state, k, v)
    rng = path / f"rng-rank{accelerator.process_index}.pt"
    if not rng.exists():  # saved by fewer processes: set_seed gave every process rank 0's generators
        rng = path / "rng-rank0.pt"
    if rng.exists():
        checkpoint.set_rng_state(checkpoint.load_state(rng))


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
