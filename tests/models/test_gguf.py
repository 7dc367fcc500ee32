"""GGUF models: a tiny Llama written with the gguf package loads through sakd's loaders into an ordinary model
with the same logits, and `sakd eval` takes the file."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from sakd.cache.store import model_files_hash
from sakd.cli import main
from sakd.config import validate
from sakd.errors import UserError
from sakd.models.load import count_parameters, load_model, load_tokenizer
from sakd.models.tiny import EOS, PAD, dense_student_config, train_tokenizer
from sakd.tools.plan_memory import estimate
from sakd.train.loop import train

gguf = pytest.importorskip("gguf")

TEXT = "def add(a, b):\n    return a + b  # 42 apples\n\nclass Point:\n    x: int = 0\n"


def _permute_for_gguf(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's row order of the query and key projections (rotary halves interleaved), which the GGUF
    loader undoes."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, -1).swapaxes(1, 2).reshape(weight.shape)


def _write_tokenizer(writer, tokenizer) -> None:
    """A byte-level BPE tokenizer as llama.cpp stores it: tokens by id, their types, the merges."""
    vocab = tokenizer.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    special = {EOS, PAD}
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types(
        [gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens]
    )
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    writer.add_eos_token_id(vocab[EOS])
    writer.add_pad_token_id(vocab[PAD])


def write_llama_gguf(path: Path, model, tokenizer) -> None:
    """`model` (a LlamaForCausalLM) and `tokenizer` as one GGUF file with fp32 tensors."""
    cfg = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    _write_tokenizer(writer, tokenizer)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    for key, tensor in model.state_dict().items():
        if cfg.tie_word_embeddings and key == "lm_head.weight":
            continue  # a tied model has no output tensor
        if key.endswith("q_proj.weight"):
            tensor = _permute_for_gguf(tensor, cfg.num_attention_heads)
        elif key.endswith("k_proj.weight"):
            tensor = _permute_for_gguf(tensor, cfg.num_key_value_heads)
        writer.add_tensor(names.get_name(key, try_suffixes=(".weight",)), tensor.float().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def tiny_gguf(request, tmp_path_factory) -> tuple[Path, torch.nn.Module, object]:
    """(file, the model written into it, the tokenizer written into it)."""
    root = tmp_path_factory.mktemp("gguf")
    tokenizer = train_tokenizer([TEXT * 4, "hello world, hello tokens 123"], 300)
    config = dense_student_config(len(tokenizer), hidden_size=32, layers=2, heads=4, max_length=128)
    config.num_key_value_heads = 2  # grouped-query attention: keys are permuted with their own head count
    config.tie_word_embeddings = request.param
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    path = root / "tiny.gguf"
    write_llama_gguf(path, model, tokenizer)
    return path, model, tokenizer


def test_gguf_model_has_the_logits_of_the_written_weights(tiny_gguf):
    path, reference, _ = tiny_gguf
    model = load_model(str(path), "student").eval()
    assert type(model) is type(reference)
    assert count_parameters(model) == count_parameters(reference)
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert tied == reference.config.tie_word_embeddings
    ids = torch.randint(0, reference.config.vocab_size, (2, 17))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)


def test_gguf_model_casts_saves_and_trains(tiny_gguf, tmp_path):
    path, reference, _ = tiny_gguf
    model = load_model(str(path), "student", torch.bfloat16)
    assert model.dtype == torch.bfloat16  # dequantized to the requested dtype
    model = model.float()
    model.save_pretrained(tmp_path / "saved")
    assert "quantization_config" not in json.loads((tmp_path / "saved" / "config.json").read_text())
    ids = torch.randint(0, reference.config.vocab_size, (2, 9))
    saved = load_model(str(tmp_path / "saved"), "student").eval()
    model.eval()
    with torch.no_grad():
        assert torch.equal(saved(ids).logits, model(ids).logits)
    model.train()
    before = model.get_input_embeddings().weight.detach().clone()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loss = model(ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss) and not torch.equal(model.get_input_embeddings().weight, before)


def test_gguf_tokenizer_is_fast_and_splits_like_the_written_one(tiny_gguf):
    path, _, written = tiny_gguf
    tokenizer = load_tokenizer(str(path), "student")
    assert tokenizer.is_fast
    assert tokenizer.eos_token == EOS and tokenizer.pad_token == PAD
    text = TEXT + EOS + "hello world"
    assert tokenizer(text)["input_ids"] == written(text)["input_ids"]
    assert (
        tokenizer(text, return_offsets_mapping=True)["offset_mapping"]
        == (written(text, return_offsets_mapping=True)["offset_mapping"])
    )


def test_gguf_without_the_gguf_package_names_the_extra(tiny_gguf, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)  # find_spec then reports the package missing
    with pytest.raises(UserError, match=r'pip install "sakd\[gguf\]"'):
        load_model(str(tiny_gguf[0]), "teacher")
    with pytest.raises(UserError, match=r'pip install "sakd\[gguf\]"'):
        load_tokenizer(str(tiny_gguf[0]), "teacher")


def test_eval_cli_takes_a_gguf_student(tiny_gguf, tmp_path, capsys):
    path, _, _ = tiny_gguf
    data = tmp_path / "some.txt"
    data.write_text(TEXT * 6)
    argv = ["eval", "--student", str(path), "--data", str(data), "--format", "json"]
    code = main([*argv, "--max-length", "48", "--max-windows", "3", "--gen-new-tokens", "2"])
    result = json.loads(capsys.readouterr().out)
    assert code == 0
    student = result["student"]
    assert student["bits_per_byte"] > 0 and student["tokens"] > 0
    assert student["size_on_disk_bytes"] == path.stat().st_size


def test_training_config_takes_gguf_teacher_and_student(tiny_gguf, base_config, tmp_path):
    """Config validation, the memory plan and a short run, with both models given as the GGUF file."""
    path, reference, _ = tiny_gguf
    data = tmp_path / "train.txt"
    data.write_text(TEXT * 8)
    raw = {**base_config, "teacher": {"model": str(path)}, "student": {"model": str(path)}}
    raw["data"] = {"train": [str(data)], "eval": [], "max_length": 32}
    raw["train"] = {**raw["train"], "max_steps": 2, "batch_size": 1, "ema_decay": None}
    cfg = validate(raw)
    assert estimate(cfg, "fp32").parts  # reads both configs from the file
    summary = train(cfg)
    assert summary["step"] == 2
    final = load_model(str(Path(cfg.output_dir) / "final"), "student")
    assert count_parameters(final) == count_parameters(reference)


def test_teacher_cache_key_follows_the_gguf_file(tiny_gguf, tmp_path):
    copy = tmp_path / "copy.gguf"
    copy.write_bytes(tiny_gguf[0].read_bytes())
    before = model_files_hash(str(copy))
    with copy.open("ab") as f:
        f.write(b"\0" * 32)  # a re-quantized or re-exported file has another size
    assert model_files_hash(str(copy)) != before
