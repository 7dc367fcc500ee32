"""On-policy distillation: the student's sampling against a plain reference, the batches of its own text
against the data pipeline on the same text, the LM loss left off the sampled tokens, a training run that
distils on the student's text, and the settings it refuses."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import metrics_records

from sakd.config import validate
from sakd.curriculum import CurriculumSpec, curriculum_at
from sakd.data.packing import collate_windows, pack_windows
from sakd.data.sampled import SampledRow, SampledText
from sakd.data.tokenize import input_format, tokenize_documents
from sakd.errors import UserError
from sakd.losses import Chunking
from sakd.losses.kd import KDSettings, logit_kd
from sakd.models.load import load_model, load_tokenizer
from sakd.train.loop import train
from sakd.train.objective import DistillObjective
from sakd.train.on_policy import OnPolicy, sample_tokens
from sakd.train.rows import LossNorm, TokenCounts, with_loss_rows
from sakd.train.teacher import LiveTeacher

PROMPT = "def total(values):\n    result = 0\n    for v in values:\n"
WRITTEN = "        result += v\n    return result\n"


@pytest.fixture(scope="module")
def pair(assets):
    student_tok = load_tokenizer(str(assets["student"]), "student")
    teacher_tok = load_tokenizer(str(assets["teacher"]), "teacher")
    return student_tok, teacher_tok


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_sampling_with_the_cache_equals_sampling_from_full_forwards(assets):
    """Key-value-cached sampling draws the same tokens as recomputing the whole sequence for every token with
    the same generator, and only from the tokenizer's ids."""
    model = load_model(str(assets["student"]), "student").train()
    prompts = torch.randint(0, 300, (3, 5), generator=torch.Generator().manual_seed(1))
    fast = sample_tokens(model, prompts, 12, 1.0, torch.Generator().manual_seed(7), vocab=300)

    generator, ids = torch.Generator().manual_seed(7), prompts
    with torch.no_grad():
        for _ in range(12):
            logits = model(input_ids=ids).logits[:, -1, :300]
            token = torch.multinomial(torch.softmax(logits.float(), -1), 1, generator=generator)
            ids = torch.cat([ids, token], dim=1)
    assert torch.equal(fast, ids[:, 5:])
    assert model.training  # the sampler restores the training mode
    other = sample_tokens(model, prompts, 12, 1.0, torch.Generator().manual_seed(8), vocab=300)
    assert not torch.equal(fast, other)


def test_the_student_text_is_batched_as_the_data_would_be(pair):
    """A prompt and what the student wrote after it (ending with its EOS) give the batch that the data
    pipeline gives for the same text, and exactly the labels inside the written text are marked sampled."""
    student_tok, teacher_tok = pair
    prompt, written = _ids(student_tok, PROMPT), [*_ids(student_tok, WRITTEN), student_tok.eos_token_id]
    text = SampledText(student_tok, teacher_tok, 256)
    batch = text.batch([SampledRow(prompt, written, window=7)])

    docs = [tokenize_documents(t, [PROMPT + WRITTEN]) for t in (student_tok, teacher_tok)]
    expected = collate_windows(pack_windows(*docs, 256), input_format(student_tok), input_format(teacher_tok))
    for (name, got), (_, want) in zip(batch.named_tensors(), expected.named_tensors(), strict=False):
        if name != "window_index":
            assert torch.equal(got, want), name
    assert batch.window_index.tolist() == [7]
    assert batch.alignment.mask.sum() > 10

    # independent: a label is sampled when its token's text reaches past the prompt's characters
    ids = docs[0][0].ids
    labelled = batch.student.labels[0] != -100
    for j in range(len(ids) - 1):
        reach = len(student_tok.decode(ids[: j + 2].tolist(), skip_special_tokens=True))
        assert bool(batch.sampled[0, j]) == (reach > len(PROMPT) or j + 1 == len(ids) - 1), j
    assert not batch.sampled[0][~labelled].any()
    assert 0 < int(batch.sampled.sum()) < int(labelled.sum())


def test_an_eos_inside_the_prompt_ends_a_document(pair):
    """A prompt that crosses a document boundary (packed windows do) gives both models their EOS there, and
    the student's part starts in the second document."""
    student_tok, teacher_tok = pair
    first, second = "x = 1\n", "import os\n"
    prompt = [*_ids(student_tok, first), student_tok.eos_token_id, *_ids(student_tok, second)]
    written = _ids(student_tok, "print(os.name)\n")
    batch = SampledText(student_tok, teacher_tok, 256).batch([SampledRow(prompt, written, window=0)])
    for side, tok in ((batch.student, student_tok), (batch.teacher, teacher_tok)):
        ids = side.input_ids[0].tolist()
        assert ids.count(tok.eos_token_id) == 1
        assert tok.decode(ids, skip_special_tokens=True) == first + second + "print(os.name)\n"
    marked = batch.sampled[0].nonzero().squeeze(-1)
    assert int(marked.min()) >= len(prompt) - 1  # nothing before the sampled text
    assert len(marked) == len(batch.student.labels[0][batch.student.labels[0] != -100]) - (len(prompt) - 1)


def test_sampled_labels_carry_no_lm_loss(pair, assets):
    """The LM part of a batch with sampled labels sums the cross-entropy of the other labels only, divided by
    their count; KD still runs at the sampled text's aligned groups."""
    student_tok, teacher_tok = pair
    prompt, written = _ids(student_tok, PROMPT), _ids(student_tok, WRITTEN)
    batch = with_loss_rows(SampledText(student_tok, teacher_tok, 256).batch([SampledRow(prompt, written, 0)]))
    student = load_model(str(assets["student"]), "student")
    teacher = load_model(str(assets["teacher"]), "teacher")
    source = LiveTeacher(
        teacher, logit_kd(KDSettings("forward_kl", 0.5, "projection", True), teacher_tok, student_tok)
    )
    point = curriculum_at(0.0, CurriculumSpec(weights={"token_weighting": 0.0}))
    counts = TokenCounts.of([batch])
    labels = batch.student.labels
    assert counts.lm == int(((labels != -100) & ~batch.sampled).sum())
    _, parts = DistillObjective(source, Chunking(16))(student, batch, point, LossNorm(counts))

    with torch.no_grad():
        logits = student(input_ids=batch.student.input_ids).logits.float()
    ce = torch.nn.functional.cross_entropy(logits[0], labels[0].clamp_min(0), reduction="none")
    own = (labels[0] != -100) & ~batch.sampled[0]
    torch.testing.assert_close(parts["lm"], ce[own].sum() / own.sum(), rtol=1e-5, atol=1e-6)
    assert parts["kd"] > 0


def test_a_run_distils_on_the_student_text(make_raw, monkeypatch):
    """With on_policy_fraction 1 every micro-batch the teacher sees is the student's own text: its teacher
    inputs are not the data's windows, the log counts every micro-batch, and training stays finite."""
    raw = make_raw(max_steps=3)
    raw["distill"] = {"on_policy_fraction": 1.0, "on_policy_prompt_tokens": 8, "on_policy_new_tokens": 16}
    seen = []
    real = OnPolicy.rewrite

    def rewrite(self, student, batch, seed, accelerator):
        out = real(self, student, batch, seed, accelerator)
        seen.append((batch, out))
        return out

    monkeypatch.setattr(OnPolicy, "rewrite", rewrite)
    summary = train(validate(raw))
    assert summary["skipped_steps"] == 0
    assert len(seen) == 6 and all(out is not None for _, out in seen)
    for data, own in seen:
        prompt = data.student.input_ids[0, :8]
        assert torch.equal(own.student.input_ids[0, :8], prompt)  # the prompt is the data's
        assert own.sampled.any()
    assert not all(torch.equal(d.teacher.input_ids, o.teacher.input_ids) for d, o in seen)
    records = metrics_records(Path(raw["output_dir"]), "train")
    assert sum(r["sampled_batches"] for r in records) == 6


def test_the_draw_depends_on_seed_step_and_micro_batch_only(make_raw):
    raw = make_raw()
    raw["distill"] = {"on_policy_fraction": 0.5, "on_policy_prompt_tokens": 8, "on_policy_new_tokens": 16}
    cfg = validate(raw)
    student_tok = load_tokenizer(raw["student"]["model"], "student")
    draws = [OnPolicy(cfg, student_tok, None, process=p) for p in (0, 1)]
    pattern = [[d.drawn(step, i) for step in range(200) for i in range(2)] for d in draws]
    assert pattern[0] == pattern[1]
    assert 0.4 < np.mean(pattern[0]) < 0.6


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"distill": {"on_policy_fraction": 0.5, "on_policy_new_tokens": 60}}, "exceeds data.max_length"),
        ({"teacher": None, "distill": {"on_policy_fraction": 0.5}}, "needs the live teacher"),
    ],
)
def test_settings_it_cannot_run_are_refused(make_raw, change, message):
    raw = copy.deepcopy(make_raw())
    raw.update(change)
    with pytest.raises(UserError, match=message):
        validate(raw)


def test_chat_data_is_refused(make_raw, pair):
    """Chat windows hold prompts and answers the sampler cannot tell apart yet: a one-line error, not a run
    that distils on the wrong text."""
    from types import SimpleNamespace

    raw = make_raw()
    raw["distill"] = {"on_policy_fraction": 0.5, "on_policy_prompt_tokens": 8, "on_policy_new_tokens": 16}
    cfg = validate(raw)
    chat = SimpleNamespace(student_target=np.ones(4, dtype=bool))
    with pytest.raises(UserError, match="plain text data only"):
        OnPolicy.of(cfg, [chat], pair, 0)
    plain = SimpleNamespace(student_target=None)
    assert OnPolicy.of(cfg, [plain], pair, 0) is not None
    raw["distill"]["on_policy_fraction"] = 0.0
    assert OnPolicy.of(validate(raw), [chat], pair, 0) is None
