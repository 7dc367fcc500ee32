"""The teacher cache: written and read back exactly, resumable, refused when it does not match, equal to the
live teacher when k covers the vocabulary, trainable with a small k, and shared by a student with another
tokenizer (keys are character offsets, not token positions)."""

from __future__ import annotations

import copy
import json
import re
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from tokenizer_kinds import tokenizer_of

import sakd.data.corpus
from sakd.cache import TeacherCache, capture_teacher_cache, open_training_cache
from sakd.cache.keys import keyed_windows
from sakd.cli import main
from sakd.config import validate
from sakd.curriculum import CurriculumSpec, curriculum_at
from sakd.data.corpus import build_windows
from sakd.data.loader import WindowLoader
from sakd.data.tokenize import input_format
from sakd.errors import UserError
from sakd.losses import Chunking
from sakd.losses.kd import KDSettings, logit_kd, top_k_kd
from sakd.losses.sparse import (
    SparseTeacherSettings,
    _bucket_divergence,
    _sparse_forward_kl,
    sparse_teacher_divergence,
)
from sakd.models.load import freeze, lm_head, load_model, load_tokenizer
from sakd.models.tiny import tiny_family_model
from sakd.train.loop import train
from sakd.train.objective import DistillObjective
from sakd.train.rows import LossNorm, TokenCounts, with_loss_rows
from sakd.train.teacher import LiveTeacher, TopKTeacher

STDLIB = Path(sysconfig.get_paths()["stdlib"])
NO_AUX = {"weights": {"token_weighting": 0.0}}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Three documents, one with multi-byte characters (so keys of byte pieces, r > 0, occur)."""
    path = tmp_path_factory.mktemp("cache_data") / "train.jsonl"
    texts = [
        (STDLIB / "textwrap.py").read_text()[:2500],
        "Café, naïve, Zürich — ✓ déjà vu. 東京 " + (STDLIB / "shlex.py").read_text()[:1500],
        (STDLIB / "bisect.py").read_text()[:800],
    ]
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


@pytest.fixture
def raw(base_config, data, tmp_path) -> dict:
    cfg = copy.deepcopy(base_config)
    cfg["data"].update(train=[str(data)], max_length=64, eval_max_windows=4)
    cfg["curriculum"] = copy.deepcopy(NO_AUX)
    cfg["output_dir"] = str(tmp_path / "run")
    return cfg


def _same_vocab(raw: dict, assets) -> dict:
    raw = copy.deepcopy(raw)
    raw["student"]["model"] = str(assets["student_same"])
    return raw


def _shards(root: Path) -> dict[str, dict[str, np.ndarray]]:
    from safetensors.numpy import load_file

    return {p.name: load_file(p) for p in sorted(root.glob("shard-*.safetensors"))}


def test_round_trip(raw, assets, tmp_path):
    cfg = validate(raw)
    summary = capture_teacher_cache(
        cfg, top_k=8, path=tmp_path / "c", shard_windows=5, device="cpu", progress=False
    )
    assert summary["complete"] and summary["num_shards"] > 1
    cache = TeacherCache.open(
        tmp_path / "c", json.loads((tmp_path / "c" / "manifest.json").read_text())["settings"]
    )
    assert cache.num_rows == summary["rows"]

    student_tok = load_tokenizer(str(assets["student"]), "s")
    teacher_tok = load_tokenizer(str(assets["teacher"]), "t")
    keyed = keyed_windows(cfg.data.train, student_tok, teacher_tok, 64)
    assert summary["rows"] == sum(len(w.teacher_ids) for w in keyed.windows)
    teacher = freeze(load_model(str(assets["teacher"]), "teacher"))
    head = lm_head(teacher)
    row = 0
    for w in keyed.windows[:3]:
        ids = torch.from_numpy(w.teacher_ids)[None]
        logits = teacher(input_ids=ids).logits[0, :, : len(teacher_tok)].float()  # (Lt, V)
        expected = torch.softmax(logits, -1).topk(8)
        got_ids, got_probs, got_tail = cache.gather(np.arange(row, row + len(w.teacher_ids)))
        assert torch.equal(got_ids, expected.indices)
        torch.testing.assert_close(got_probs, expected.values, rtol=1e-3, atol=1e-4)  # stored as float16
        torch.testing.assert_close(got_tail, 1 - expected.values.sum(-1), rtol=1e-4, atol=1e-5)
        row += len(w.teacher_ids)
    assert head.weight.shape[0] >= len(teacher_tok)
    tails = np.concatenate([shard["tail"] for shard in _shards(tmp_path / "c").values()])
    assert summary["top_k_mass"] == pytest.approx(1 - tails.astype(np.float64).mean(), abs=1e-9)
    assert 0 < summary["top_k_mass"] < 1
    keys = cache.keys()
    window_keys = np.concatenate([keyed.window_keys(w) for w in range(len(keyed.windows))])
    np.testing.assert_array_equal(keys, window_keys[: len(keys)])
    assert (keys[:, 2] > 0).any(), "the multi-byte characters should give byte-piece keys"


def test_resume_after_interruption(raw, tmp_path):
    cfg = validate(raw)
    root = tmp_path / "c"
    first = capture_teacher_cache(cfg, top_k=4, path=root, shard_windows=4, max_shards=2, progress=False)
    assert not first["complete"] and first["shards"] == 2
    # a shard killed while being written, and a leftover manifest temp file
    (root / "shard-00002.safetensors.tmp").write_bytes(b"partial")
    (root / "manifest.json.tmp").write_text("{")
    with pytest.raises(UserError, match="incomplete"):
        raw_cached = copy.deepcopy(raw)
        raw_cached["teacher"]["cache"] = str(root)
        train(validate(raw_cached))
    second = capture_teacher_cache(cfg, top_k=4, path=root, shard_windows=4, progress=False)
    assert second["complete"] and second["written_now"] == second["num_shards"] - 2

    whole = capture_teacher_cache(cfg, top_k=4, path=tmp_path / "whole", shard_windows=4, progress=False)
    resumed, reference = _shards(root), _shards(tmp_path / "whole")
    assert resumed.keys() == reference.keys()
    for name in reference:
        for key in reference[name]:
            np.testing.assert_array_equal(resumed[name][key], reference[name][key])
    assert whole["rows"] == second["rows"]


def test_mismatch_refused(raw, tmp_path, capsys):
    cfg = validate(raw)
    root = tmp_path / "c"
    capture_teacher_cache(cfg, top_k=4, path=root, shard_windows=64, progress=False)
    with pytest.raises(UserError, match="other settings"):  # resuming with another top-k
        capture_teacher_cache(cfg, top_k=5, path=root, shard_windows=64, progress=False)

    changed = copy.deepcopy(raw)
    changed["teacher"]["cache"] = str(root)
    changed["data"]["max_length"] = 48
    config = tmp_path / "changed.yaml"
    config.write_text(yaml.safe_dump(changed))
    capsys.readouterr()
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "max_length" in err[0] and "teacher cache" in err[0], err

    aux = copy.deepcopy(raw)
    aux["teacher"]["cache"] = str(root)
    aux["curriculum"] = {"weights": {"feature": 0.5}}
    with pytest.raises(UserError, match=r"teacher.cache.*feature"):
        validate(aux)


def test_data_changed_under_the_same_path_is_refused(raw, data, tmp_path, capsys):
    """The sources are named by path: rewriting the data file in place must not let training join another
    text's positions to the cached teacher."""
    moved = tmp_path / "train.jsonl"
    moved.write_text(data.read_text())
    raw = copy.deepcopy(raw)
    raw["data"]["train"] = [str(moved)]
    root = tmp_path / "c"
    capture_teacher_cache(validate(raw), top_k=4, path=root, shard_windows=64, progress=False)
    raw["teacher"]["cache"] = str(root)
    config = tmp_path / "cached.yaml"
    config.write_text(yaml.safe_dump(raw))
    lines = moved.read_text().splitlines()
    lines[1] = json.dumps({"text": json.loads(lines[1])["text"].replace("Café", "Cafe")})
    moved.write_text("\n".join(lines) + "\n")

    capsys.readouterr()
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "training data changed" in err[0] and str(root) in err[0], err
    with pytest.raises(UserError, match="training data changed"):
        capture_teacher_cache(validate(raw), top_k=4, path=root, shard_windows=64, progress=False)


def test_a_cache_captured_without_a_data_fingerprint_keeps_its_other_checks(raw, assets, tmp_path):
    cfg = validate(raw)
    root = tmp_path / "c"
    capture_teacher_cache(cfg, top_k=4, path=root, shard_windows=64, progress=False)
    manifest = json.loads((root / "manifest.json").read_text())
    del manifest["settings"]["data_fingerprint"]
    (root / "manifest.json").write_text(json.dumps(manifest))
    student_tok = load_tokenizer(str(assets["student"]), "s")
    teacher_tok = load_tokenizer(str(assets["teacher"]), "t")
    windows = build_windows(cfg.data.train, student_tok, teacher_tok, 64)
    args = (cfg.data.train, 64, cfg.teacher.model, student_tok, teacher_tok)
    assert open_training_cache(root, windows, *args).cache.num_rows > 0
    with pytest.raises(UserError, match="max_length"):
        open_training_cache(root, windows, cfg.data.train, 48, *args[2:])


@pytest.mark.parametrize(
    "name",
    [
        "/tmp/shard.safetensors",
        "../shard.safetensors",
        "sub/shard.safetensors",
        "sub\\shard.safetensors",
        "..",
        "link.safetensors",
    ],
)
def test_manifest_naming_a_file_outside_the_cache_is_refused(raw, tmp_path, name):
    """Neither training nor a resumed capture reads or replaces files the manifest names outside the
    folder: absolute names, separators, '..', or a link that resolves elsewhere."""
    cfg = validate(raw)
    root = tmp_path / "c"
    capture_teacher_cache(cfg, top_k=4, path=root, shard_windows=64, progress=False)
    (tmp_path / "elsewhere.safetensors").write_bytes((root / "shard-00000.safetensors").read_bytes())
    (root / "link.safetensors").symlink_to(tmp_path / "elsewhere.safetensors")
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["shards"]["0"]["file"] = name
    (root / "manifest.json").write_text(json.dumps(manifest))

    with pytest.raises(UserError, match="not a file of the cache folder"):
        TeacherCache.open(root, manifest["settings"])
    with pytest.raises(UserError, match="not a file of the cache folder"):
        capture_teacher_cache(cfg, top_k=4, path=root, shard_windows=64, progress=False)


@pytest.fixture(scope="module")
def bos_teacher(tmp_path_factory) -> Path:
    """A Llama teacher whose tokenizer puts <s> before text, as Llama, Mistral and Gemma tokenizers do."""
    folder = tmp_path_factory.mktemp("bos_teacher")
    tokenizer = tokenizer_of("metaspace_bpe_bos")
    tiny_family_model("llama", len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("vocab", ["same", "cross", "cross_bos"])
def test_full_vocabulary_cache_equals_live_teacher(raw, assets, bos_teacher, tmp_path, vocab):
    """With k = the teacher's vocabulary the cached KD part of a batch equals the live one (same student
    weights), at two temperatures, for the fast forward KL and for the general bucket layout (jsd). A
    teacher with a BOS reads it before every window in both (the capture stores its text positions only)."""
    raw = _same_vocab(raw, assets) if vocab == "same" else raw
    if vocab == "cross_bos":
        raw["teacher"]["model"] = str(bos_teacher)
    root = tmp_path / "c"
    cfg = validate(raw)
    capture_teacher_cache(cfg, top_k=10_000, path=root, probs_dtype="float32", device="cpu", progress=False)
    student_tok = load_tokenizer(cfg.student.tokenizer_path, "s")
    teacher_tok = load_tokenizer(cfg.teacher.tokenizer_path, "t")
    windows = build_windows(cfg.data.train, student_tok, teacher_tok, 64)
    formats = {"student": input_format(student_tok), "teacher": input_format(teacher_tok)}
    assert len(formats["teacher"].prefix) == (1 if vocab == "cross_bos" else 0)
    batch = with_loss_rows(WindowLoader(windows, 4, seed=0, **formats).next_batch())
    opened = open_training_cache(
        root, windows, cfg.data.train, 64, cfg.teacher.model, student_tok, teacher_tok
    )
    assert opened.coverage["coverage"] == 1.0
    cached = with_loss_rows(opened.attach(batch))
    teacher = freeze(load_model(cfg.teacher.model, "teacher"))
    student = load_model(cfg.student.model, "student")
    for temperature in (1.0, 2.0):
        spec = CurriculumSpec(**NO_AUX, temperature_start=temperature, temperature_end=temperature)
        point = curriculum_at(0.0, spec)
        for divergence in ("forward_kl", "jsd"):
            grads = {}
            for fused in (False, True):  # the closed-form gradients (forward KL) against autograd
                settings = KDSettings(divergence, 0.5, "projection", fused)
                chunking = Chunking(37)
                live = DistillObjective(
                    LiveTeacher(teacher, logit_kd(settings, teacher_tok, student_tok)), chunking
                )
                from_cache = DistillObjective(
                    TopKTeacher(top_k_kd(settings, teacher_tok, student_tok)), chunking
                )
                for name, objective, model_batch in (("live", live, batch), ("cached", from_cache, cached)):
                    norm = LossNorm(TokenCounts.of([model_batch]))
                    loss, parts = objective(student, model_batch, point, norm)
                    loss.backward()
                    grads[name, fused] = [p.grad.clone() for p in student.parameters()]
                    student.zero_grad(set_to_none=True)
                    if name == "live":
                        expected = float(parts["kd"])
                        assert expected > 0
                    else:
                        assert float(parts["kd"]) == pytest.approx(expected, rel=1e-5), (
                            temperature,
                            divergence,
                        )
            first = grads["live", False]
            for key, value in grads.items():
                for g, r in zip(value, first, strict=True):
                    torch.testing.assert_close(
                        g, r, rtol=1e-4, atol=1e-6, msg=f"{key} {divergence} T={temperature}"
                    )


def test_sparse_divergence_is_a_lower_bound_and_exact_at_full_k():
    torch.manual_seed(0)
    student, teacher = torch.randn(5, 30), torch.randn(5, 30) * 3
    p = torch.softmax(teacher, -1)
    full = sparse_teacher_divergence(
        student,
        torch.arange(30).expand(5, 30),
        p,
        torch.zeros(5),
        1.0,
        settings=SparseTeacherSettings(30, student_vocab=30),
    )
    exact = (p * (p.log() - torch.log_softmax(student, -1))).sum(-1)
    torch.testing.assert_close(full, exact)
    top = p.topk(6)
    sparse = sparse_teacher_divergence(
        student,
        top.indices,
        top.values,
        1 - top.values.sum(-1),
        1.0,
        settings=SparseTeacherSettings(30, student_vocab=30),
    )
    assert (sparse <= exact + 1e-6).all() and (sparse > 0).all()


@pytest.fixture(scope="module")
def sharp_teacher(assets, tmp_path_factory) -> Path:
    """The fixture teacher with a 30x LM head: peaked distributions, so that KD has something to teach."""
    folder = tmp_path_factory.mktemp("sharp") / "teacher"
    model = load_model(str(assets["teacher"]), "teacher")
    with torch.no_grad():
        lm_head(model).weight.mul_(30.0)
    model.save_pretrained(folder)
    load_tokenizer(str(assets["teacher"]), "teacher").save_pretrained(folder)
    return folder


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_sparse_forward_kl_equals_the_bucket_layout(temperature):
    """The fast forward KL (no dense buckets) against the dense k + 1 bucket layout: values and gradients,
    with duplicate and unmapped targets, zero probabilities, rows without tail and rows without any mass."""
    torch.manual_seed(1)
    n, k, width = 7, 5, 9
    logits = torch.randn(n, width, requires_grad=True)
    targets = torch.randint(0, width, (n, k))
    targets[0, 1] = targets[0, 0]  # two teacher tokens onto one student token
    targets[1, 2] = -1  # unmapped
    targets[2] = -1  # nothing mapped, no tail: no mass
    targets[3] = torch.tensor([0, 1, 2, 3, 4])
    probs = torch.softmax(torch.randn(n, k), -1) * 0.8
    probs[4, 3] = 0.0
    tail = torch.full((n,), 0.2)
    tail[2] = 0.0
    logp, log_tail = probs.log() / temperature, tail.log()
    fast = _sparse_forward_kl(
        torch.log_softmax(logits / temperature, -1), targets, logp, log_tail, temperature
    )
    (grad_fast,) = torch.autograd.grad(fast.sum(), logits)
    dense = _bucket_divergence(logits, targets, logp, log_tail, temperature, "forward_kl", 0.5)
    (grad_dense,) = torch.autograd.grad(dense.sum(), logits)
    torch.testing.assert_close(fast, dense, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_fast, grad_dense, rtol=1e-4, atol=1e-6)
    assert fast[2] == 0 and (fast[[0, 1, 3, 4]] > 0).all()


@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "jsd", "tvd"])
def test_rows_without_teacher_are_zero_with_finite_gradients(name):
    """The cached row loss evaluates every row: rows without a teacher (all zeros) must give 0 and finite
    gradients, and a top-k probability stored as 0 must not make any divergence infinite."""
    torch.manual_seed(0)
    logits = torch.randn(4, 12, requires_grad=True)
    ids = torch.tensor([[3, 5, 7], [0, 0, 0], [1, 2, 4], [0, 0, 0]])
    probs = torch.tensor([[0.5, 0.2, 0.0], [0.0, 0.0, 0.0], [0.3, 0.3, 0.1], [0.0, 0.0, 0.0]])
    tail = torch.tensor([0.3, 0.0, 0.3, 0.0])
    rows = sparse_teacher_divergence(
        logits, ids, probs, tail, 1.0, settings=SparseTeacherSettings(12, name, student_vocab=12)
    )
    (grad,) = torch.autograd.grad(rows.sum(), logits)
    assert rows[1] == 0 and rows[3] == 0 and torch.isfinite(rows).all() and (rows[[0, 2]] > 0).all()
    assert torch.isfinite(grad).all() and (grad[[1, 3]] == 0).all()


def _kd_losses(run: Path) -> list[float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss_kd"] for r in records if r.get("event") == "train"]


def test_trains_with_small_k_and_serves_another_tokenizer(raw, assets, sharp_teacher, tmp_path, monkeypatch):
    # captured for the same-tokenizer student; trained into the student with another tokenizer, with the
    # knowledge-gap token weights of the default curriculum
    raw["teacher"]["model"] = str(sharp_teacher)
    root = tmp_path / "c"
    capture_teacher_cache(validate(_same_vocab(raw, assets)), top_k=4, path=root, progress=False)
    run = copy.deepcopy(raw)
    run["teacher"]["cache"] = str(root)
    run["curriculum"] = {}
    run["train"].update(max_steps=12, lr=3e-3, warmup_steps=0, ema_decay=None)
    tokenized = []  # (tokenizer size, documents) of every tokenization
    plain = sakd.data.corpus.tokenize_documents  # every tokenization of sources goes through sakd.data.corpus
    monkeypatch.setattr(
        sakd.data.corpus,
        "tokenize_documents",
        lambda tok, docs: tokenized.append(len(docs)) or plain(tok, docs),
    )
    summary = train(validate(run))
    # the training documents are tokenized once per tokenizer: keying the cache reuses the training windows
    evaluation = 2 if run["data"].get("eval") else 0
    assert len(tokenized) == 2 + evaluation, tokenized
    assert summary["step"] == 12 and summary["skipped_steps"] == 0
    assert "cached" in summary["objective"]
    coverage = summary["teacher_cache"]
    assert coverage["coverage"] > 0.9, coverage
    kd = _kd_losses(Path(run["output_dir"]))
    assert all(np.isfinite(kd)) and np.mean(kd[-3:]) < np.mean(kd[:3]), kd


def test_cli_cache_teacher(raw, tmp_path, capsys):
    config = tmp_path / "c.yaml"
    raw["train"]["progress"] = False
    config.write_text(yaml.safe_dump(raw))
    assert main(["cache-teacher", str(config), "--top-k", "4", "--set", "data.max_length=32"]) == 0
    out = capsys.readouterr().out
    assert "teacher-cache" in out and "top-4" in out
    # a tiny teacher keeps little of its probability in a top-4: the mean is said, with the remedy
    assert re.search(r"the top-4 holds \d+\.\d% of the teacher's probability", out), out
    assert "a larger --top-k" in out
    assert json.loads((Path(raw["output_dir"]) / "teacher-cache" / "manifest.json").read_text())["complete"]
    assert main(["cache-teacher", str(config), "--top-k", "0"]) == 2


def test_a_cache_captured_without_the_teachers_bos_is_refused(bos_teacher, assets):
    """The settings record the special tokens the teacher read before each window. A cache captured before
    they were recorded fed the teacher none: it still serves a teacher without a BOS, not one with."""
    from sakd.cache.store import capture_settings, settings_mismatch

    for folder, expected in ((bos_teacher, ["teacher_prefix"]), (assets["teacher"], [])):
        now = capture_settings(str(folder), load_tokenizer(str(folder), "teacher"), [], 64, "fingerprint")
        before = {k: v for k, v in now.items() if k != "teacher_prefix"}
        assert settings_mismatch(before, now) == expected
