"""The training step never waits for the device: on a GPU every such wait idles it until the host has queued
the next work. On the CPU nothing waits, so the tests record the operations that would: reading a value to
the host (`item`, `bool`, `int`, a scalar comparison), `nonzero`, and selection or assignment by a boolean
mask, whose result size depends on the data."""

from __future__ import annotations

import collections
import traceback
from dataclasses import replace

import pytest
import torch
from accelerate import Accelerator
from torch.utils._python_dispatch import TorchDispatchMode

from sakd.cache import capture_teacher_cache
from sakd.config import validate
from sakd.curriculum import curriculum_at
from sakd.models.load import load_tokenizer
from sakd.train.inputs import training_inputs
from sakd.train.rows import LossNorm, loss_rows, with_loss_rows
from sakd.train.step import build_training, prepare_batch, step_batches, train_step

READS = {
    "aten::_local_scalar_dense",
    "aten::nonzero",
    "aten::is_nonzero",
    "aten::masked_select",
    "aten::equal",
}
MASKED = {"aten::index", "aten::index_put", "aten::index_put_", "aten::_index_put_impl_"}
# transformers' causal-mask builder checks the padding mask / packed positions on the host at every model
# forward (`masking_utils`, unless tracing); that is the models' code, outside the step's control
OUTSIDE = ("transformers/masking_utils.py",)


class HostReads(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.found: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        waits = name in READS or (
            name in MASKED and any(t is not None and t.dtype == torch.bool for t in args[1])
        )
        if waits:
            frames = traceback.extract_stack()
            if not any(any(o in f.filename for o in OUTSIDE) for f in frames):
                ours = [
                    f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno}" for f in frames if "/sakd/" in f.filename
                ]
                self.found[name, " <- ".join(ours[-3:])] += 1
        return func(*args, **(kwargs or {}))


def _setup(raw, cache_root=None):
    if cache_root is not None:
        capture_teacher_cache(validate(raw), top_k=8, path=cache_root, progress=False)
        raw["teacher"]["cache"] = str(cache_root)
    cfg = validate(raw)
    accelerator = Accelerator(cpu=True)
    student_tok = load_tokenizer(cfg.student.tokenizer_path, "student")
    teacher_tok = load_tokenizer(cfg.teacher.tokenizer_path, "teacher")
    inputs = training_inputs(cfg, student_tok, teacher_tok, processes=1, progress=False)
    t = build_training(cfg, accelerator, "fp32", student_tok, teacher_tok, inputs.cached)
    loader = inputs.loader(cfg, accelerator, student_tok, teacher_tok)
    return t, accelerator, loader, curriculum_at(0.5, cfg.curriculum)


@pytest.mark.parametrize("setup", ["cross", "same", "cached"])
def test_a_training_step_never_waits_for_the_device(base_config, assets, tmp_path, setup):
    raw = base_config
    raw["train"].update(grad_accum=2, max_grad_norm=1.0)
    if setup == "same":
        raw["student"]["model"] = str(assets["student_same"])
    t, accelerator, loader, point = _setup(raw, tmp_path / "cache" if setup == "cached" else None)
    for _ in range(2):  # the first step builds the optimizer state
        host = [loader.next_batch() for _ in range(2)]
        batches = step_batches(host, accelerator)
        reads = HostReads()
        with reads:
            result = train_step(t, batches, point)
    assert not reads.found, dict(reads.found)
    assert bool(result.stepped) and torch.isfinite(result.loss)


def test_a_skipped_step_is_decided_without_waiting(base_config, assets):
    """A NaN loss skips the step on the device: the weights, the optimizer state and the EMA stay as they were."""
    t, accelerator, loader, point = _setup(base_config)
    train_step(t, step_batches([loader.next_batch()], accelerator), point)
    batches = step_batches([loader.next_batch()], accelerator)
    before = [p.detach().clone() for p in t.student.parameters()]
    shadow = {k: v.clone() for k, v in t.ema.shadow.items()}
    moments = [s["exp_avg"].clone() for s in t.optimizer.state.values()]
    hidden = t.teacher.model.norm.register_forward_hook(lambda _m, _a, out: out.fill_(float("nan")))
    reads = HostReads()
    with reads:
        result = train_step(t, batches, point)
    hidden.remove()
    assert not reads.found, dict(reads.found)
    assert not bool(result.stepped)
    for p, q in zip(t.student.parameters(), before, strict=True):
        assert torch.equal(p, q)
    for k, v in shadow.items():
        assert torch.equal(t.ema.shadow[k], v)
    assert all(torch.equal(s["exp_avg"], m) for s, m in zip(t.optimizer.state.values(), moments, strict=True))
    assert t.ema.updates == 1


def test_loss_rows_put_the_aligned_group_ends_first(base_config):
    t, accelerator, loader, point = _setup(base_config)
    batch = loader.next_batch()
    rows = loss_rows(batch)
    labels, mask = batch.student.labels, batch.alignment.mask
    length, teacher_length = labels.shape[1], batch.teacher.input_ids.shape[1]
    k = int(mask.sum())
    assert rows.teacher.shape[0] == k > 0
    # every labelled position once, the group ends first in (b, g) order
    assert sorted(rows.student.tolist()) == (labels.flatten() != -100).nonzero().squeeze(-1).tolist()
    b, g = mask.nonzero(as_tuple=True)
    assert rows.student[:k].tolist() == (b * length + batch.alignment.student_pos[b, g]).tolist()
    assert rows.teacher.tolist() == (b * teacher_length + batch.alignment.teacher_pos[b, g]).tolist()
    assert rows.group.tolist() == (b * mask.shape[1] + g).tolist()


def test_prepared_batches_give_the_same_loss(base_config):
    """`prepare_batch` (host rows, attention masks without padding dropped) against the plain batch with its
    loss rows and full masks, with and without padding."""
    t, accelerator, loader, point = _setup(base_config)
    batch = loader.next_batch()
    mask, labels = batch.student.attention_mask.clone(), batch.student.labels.clone()
    mask[0, -3:] = 0
    labels[0, -4:] = -100
    padded = replace(batch, student=replace(batch.student, attention_mask=mask, labels=labels))
    counts = step_batches([batch], accelerator).counts
    for host in (batch, padded):
        prepared = prepare_batch(host, accelerator.device)
        assert (prepared.student.attention_mask is not None) == (host is padded)
        assert (prepared.teacher.attention_mask is None) == bool(host.teacher.attention_mask.all())
        plain = with_loss_rows(host)
        losses = [t.objective(t.student, b, point, LossNorm(counts))[0] for b in (plain, prepared)]
        torch.testing.assert_close(losses[0], losses[1], rtol=1e-6, atol=1e-6)


def test_fp16_grad_scaler_skips_overflow_on_the_device(base_config, monkeypatch):
    """The fp16 path (a GradScaler, as on a GPU without bf16): gradients are unscaled before the norm, an
    overflow skips the step through the same device-side verdict and halves the scale; nothing waits."""
    t, accelerator, loader, point = _setup(base_config)
    # what Accelerate sets up for fp16 on a GPU (its process-wide state is fixed by the first test: the
    # accelerator is told so rather than built again)
    monkeypatch.setattr(Accelerator, "mixed_precision", property(lambda _self: "fp16"))
    accelerator.native_amp = True
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    before = [p.detach().clone() for p in t.student.parameters()]
    batches = step_batches([loader.next_batch()], accelerator)
    reads = HostReads()
    with reads:
        result = train_step(t, batches, point)
    assert not reads.found, dict(reads.found)
    assert bool(result.stepped) and accelerator.scaler.get_scale() == 2.0**10
    assert float(result.grad_norm) < 1e3  # unscaled: the scale (1024) is not in it
    assert any(not torch.equal(p, q) for p, q in zip(t.student.parameters(), before, strict=True))

    before = [p.detach().clone() for p in t.student.parameters()]
    hidden = t.teacher.model.norm.register_forward_hook(lambda _m, _a, out: out.fill_(float("inf")))
    result = train_step(t, step_batches([loader.next_batch()], accelerator), point)
    hidden.remove()
    assert not bool(result.stepped) and accelerator.scaler.get_scale() == 2.0**9
    assert all(torch.equal(p, q) for p, q in zip(t.student.parameters(), before, strict=True))
