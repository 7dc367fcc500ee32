"""Teacher offload: layers live in host memory and visit the device for their forward only; the teacher's
outputs (and the hidden state the distillation loss reads) are unchanged."""

from __future__ import annotations

import torch
from batches import batch_of
from transformers import AutoModelForCausalLM

from sakd.train.sharding import decoder_layers, offload, place_teacher
from sakd.train.teacher import teacher_pass


def test_offloaded_teacher_gives_the_same_outputs_and_moves_each_layer(assets):
    plain = AutoModelForCausalLM.from_pretrained(assets["teacher"]).eval()
    moved = AutoModelForCausalLM.from_pretrained(assets["teacher"]).eval()
    # "meta" as the host shows that layers really leave between forwards and come back for their own.
    visits = []
    for i, layer in enumerate(decoder_layers(moved)):
        layer.register_forward_pre_hook(
            lambda m, _a, i=i: visits.append((i, next(m.parameters()).device.type))
        )
    offload(moved, torch.device("cpu"), host="cpu")
    ids = torch.randint(0, 100, (2, 12))
    batch = batch_of(ids, ids)
    with torch.no_grad():
        expected = teacher_pass(plain, batch).hidden
        got = teacher_pass(moved, batch).hidden
        torch.testing.assert_close(moved(input_ids=ids).logits, plain(input_ids=ids).logits)
    torch.testing.assert_close(got, expected)
    assert [i for i, _ in visits[: len(decoder_layers(moved))]] == list(range(len(decoder_layers(moved))))
    assert moved.sakd_offloaded


def test_each_layer_visits_the_device_for_its_own_forward_only(assets):
    """Every move of every layer, in order: to the device just before its forward, back to the host right
    after it ("cpu:0" stands for the device, "cpu" for the host, on a machine without an accelerator)."""
    model = AutoModelForCausalLM.from_pretrained(assets["student"]).eval()
    layers = decoder_layers(model)
    moves = []
    for i, layer in enumerate(layers):
        real_to = layer.to

        def spy(target, *args, i=i, real_to=real_to, **kwargs):
            moves.append((i, str(target)))
            return real_to(target, *args, **kwargs)

        layer.to = spy
    offload(model, torch.device("cpu", 0), host="cpu")
    moves.clear()  # the initial move of every layer to the host
    with torch.no_grad():
        model(input_ids=torch.zeros(1, 8, dtype=torch.long))
    assert moves == [(i, d) for i in range(len(layers)) for d in ("cpu:0", "cpu")]


def test_placement_on_one_process_is_a_full_copy(assets):
    model = AutoModelForCausalLM.from_pretrained(assets["teacher"])
    assert place_teacher(model, "shard", torch.device("cpu"), 1) is model
    assert not hasattr(model, "sakd_offloaded")


def test_training_with_an_offloaded_teacher_equals_a_replicated_one(base_config, tmp_path):
    import copy

    from safetensors.torch import load_file

    from sakd.config import validate
    from sakd.train.loop import train

    finals = []
    for placement in ("replicate", "offload"):
        raw = copy.deepcopy(base_config)
        raw["teacher"]["placement"] = placement
        raw["train"]["max_steps"] = 2
        raw["data"]["eval"] = []
        raw["output_dir"] = str(tmp_path / placement)
        train(validate(raw))
        finals.append(load_file(str(tmp_path / placement / "final" / "model.safetensors")))
    assert finals[0].keys() == finals[1].keys()
    for k in finals[0]:
        torch.testing.assert_close(finals[0][k], finals[1][k], rtol=0, atol=0)
