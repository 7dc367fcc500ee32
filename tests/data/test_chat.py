"""Chat data between two models with different chat templates and tokenizers: only assistant content (and each
model's own end-of-turn token) carries a loss, and distillation rows lie inside assistant content."""

from __future__ import annotations

import copy
import json
import logging

import numpy as np
import pytest
from chat_kinds import chat_tokenizer, conversation

from sakd.data.chat import chat_prompt, render_chat, tokenize_example, turn_end_id
from sakd.data.corpus import build_windows, tokenized_sources
from sakd.data.formats import Chat, Completion
from sakd.data.packing import collate_windows, pack_windows
from sakd.data.sources import load_documents
from sakd.data.tokenize import input_format
from sakd.errors import UserError

TEACHER_END, STUDENT_END = "<|im_end|>", "<|eot_id|>"


@pytest.fixture(scope="module")
def tokenizers():
    return chat_tokenizer("llama3"), chat_tokenizer("chatml")  # student, teacher


def _chats(count: int, start: int = 0) -> list[Chat]:
    return [Chat(tuple(conversation(i)), 0, f"row {i}") for i in range(start, start + count)]


def _contents(chat: Chat) -> list[str]:
    return [m["content"].strip() for i, m in enumerate(chat.messages) if chat.trained(i)]


def _batch(tokenizers, chats, max_length=512):
    student, teacher = tokenizers
    windows = pack_windows(
        [tokenize_example(student, c, "student") for c in chats],
        [tokenize_example(teacher, c, "teacher") for c in chats],
        max_length,
    )
    return windows, collate_windows(windows, input_format(student), input_format(teacher))


def _labelled_text(tokenizer, row_ids, row_labels, end_token: str) -> list[str]:
    """The labelled tokens of one row decoded, split at the end-of-turn token: one string per assistant turn."""
    labelled = row_labels[row_labels != -100].tolist()
    text = tokenizer.decode(labelled, skip_special_tokens=False)
    assert text.endswith(end_token)
    return text.removesuffix(end_token).split(end_token)


def test_labels_cover_assistant_content_and_end_of_turn_only(tokenizers):
    chats = _chats(6)
    windows, batch = _batch(tokenizers, chats)
    assert len(windows) == 1  # all six conversations fit one window, none split
    expected = [content for chat in chats for content in _contents(chat)]
    for side, tokenizer, end in (
        ("student", tokenizers[0], STUDENT_END),
        ("teacher", tokenizers[1], TEACHER_END),
    ):
        turns = _labelled_text(tokenizer, batch.side(side).input_ids[0], batch.side(side).labels[0], end)
        # the first token of each content is predicted by the prompt's last token, so it is labelled too
        assert turns == expected, side
        assert int(batch.side(side).target_bytes.sum()) == sum(len(c.encode()) for c in expected)


def test_prompt_tokens_carry_no_loss_and_no_group(tokenizers):
    chats = _chats(4)
    _, batch = _batch(tokenizers, chats)
    for side, tokenizer in (("student", tokenizers[0]), ("teacher", tokenizers[1])):
        tokens = batch.side(side)
        ids, labels, group = tokens.input_ids[0], tokens.labels[0], tokens.group[0]
        prompt_words = {"terse", "Tell", "please", "more"}
        for position in np.flatnonzero(labels.numpy() != -100):
            assert not any(w in tokenizer.decode([int(ids[position + 1])]) for w in prompt_words)
        grouped = tokenizer.decode(ids[group >= 0].tolist(), skip_special_tokens=False)
        assert grouped == "".join(c for chat in chats for c in _contents(chat)), side


def test_every_distillation_row_lies_inside_assistant_content(tokenizers):
    student, teacher = tokenizers
    chats = _chats(8)
    _, batch = _batch(tokenizers, chats)
    contents = "".join(c for chat in chats for c in _contents(chat))
    rows = 0
    for b in range(batch.alignment.mask.shape[0]):
        s_group, t_group = batch.student.group[b], batch.teacher.group[b]
        s_ids, t_ids = batch.student.input_ids[b], batch.teacher.input_ids[b]
        for g in np.flatnonzero(batch.alignment.mask[b].numpy()):
            s_pos, t_pos = int(batch.alignment.student_pos[b, g]), int(batch.alignment.teacher_pos[b, g])
            # the position and the token it predicts are content tokens on both sides...
            assert s_group[s_pos] == g and s_group[s_pos + 1] == g + 1
            assert t_group[t_pos] == g and t_group[t_pos + 1] == g + 1
            # ...and both sides have read the same content text up to there
            s_text = student.decode(s_ids[: s_pos + 1][s_group[: s_pos + 1] >= 0].tolist())
            t_text = teacher.decode(t_ids[: t_pos + 1][t_group[: t_pos + 1] >= 0].tolist())
            assert s_text == t_text and s_text in contents
            rows += 1
    assert rows > 50


def test_end_of_turn_tokens_are_each_models_own(tokenizers):
    student, teacher = tokenizers
    _, batch = _batch(tokenizers, _chats(3))
    turns = sum(len(_contents(c)) for c in _chats(3))
    for side, tokenizer, end in (("student", student, STUDENT_END), ("teacher", teacher, TEACHER_END)):
        labels, group = batch.side(side).labels[0], batch.side(side).group[0]
        end_id = tokenizer.convert_tokens_to_ids(end)
        assert int((labels == end_id).sum()) == turns
        # the end-of-turn token is labelled but aligned to nothing
        assert (group[1:][labels[:-1] == end_id] == -1).all()
    assert turn_end_id(student) == student.convert_tokens_to_ids(STUDENT_END)


def test_templates_differ_and_bos_is_left_to_the_window_prefix(tokenizers):
    student, teacher = tokenizers
    chat = _chats(1)[0]
    s_text, t_text = render_chat(student, chat, "student").text, render_chat(teacher, chat, "teacher").text
    assert "<|start_header_id|>" in s_text and "<|im_start|>" in t_text
    assert not s_text.startswith("<|begin_of_text|>")  # the student's window prefix puts its BOS
    assert input_format(student).prefix == (student.bos_token_id,)
    assert chat_prompt(student, "hi").endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_prompt_completion_strings_learn_the_completion_and_eos(tokenizers):
    student, teacher = tokenizers
    example = Completion("Question: what is tea?\nAnswer:", " A drink.", "row 0")
    _, batch = _batch(tokenizers, [example, example])
    labels = batch.student.labels[0]
    labelled = student.decode(labels[labels != -100].tolist(), skip_special_tokens=False)
    assert labelled == f"A drink.{student.eos_token}A drink.{student.eos_token}"


def test_prompt_messages_of_prompt_completion_are_context_only(tmp_path, tokenizers):
    path = tmp_path / "pc.jsonl"
    row = {
        "prompt": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Earlier answer."}],
        "completion": [{"role": "assistant", "content": "Trained answer."}],
    }
    path.write_text(json.dumps(row) + "\n")
    (example,) = load_documents(path)
    assert isinstance(example, Chat) and _contents(example) == ["Trained answer."]
    windows = build_windows([str(path)], *tokenizers, max_length=128)
    labels = collate_windows(windows, input_format(tokenizers[0]), input_format(tokenizers[1])).student.labels
    text = tokenizers[0].decode(labels[0][labels[0] != -100].tolist(), skip_special_tokens=False)
    assert text == f"Trained answer.{STUDENT_END}"


def test_long_conversations_are_cut_at_group_boundaries_and_counted(tokenizers, caplog):
    chats = _chats(6)
    with caplog.at_level(logging.INFO, logger="sakd.data.packing"):
        windows, batch = _batch(tokenizers, chats, max_length=48)
    counted = [r.getMessage() for r in caplog.records if "conversations are longer" in r.getMessage()]
    assert counted and counted[0].startswith(f"{counted[0].split()[0]} of 6 conversations")
    assert int(counted[0].split()[0]) > 0
    assert all(len(w.student_ids) <= 48 and len(w.teacher_ids) <= 48 for w in windows)
    # the cut falls between groups: each window's content texts still agree on both sides
    for w in windows:
        s_text = tokenizers[0].decode(w.student_ids[w.student_group >= 0].tolist())
        t_text = tokenizers[1].decode(w.teacher_ids[w.teacher_group >= 0].tolist())
        assert s_text == t_text


def test_short_conversations_are_never_split_between_windows(tokenizers):
    student, teacher = tokenizers
    chats = _chats(12)
    windows, _ = _batch(tokenizers, chats, max_length=160)
    assert len(windows) > 1
    starts = [student.convert_tokens_to_ids("<|start_header_id|>")]
    for w in windows:
        assert int(w.student_ids[0]) in starts  # every window starts at a conversation's start
        assert int(w.teacher_ids[0]) == teacher.convert_tokens_to_ids("<|im_start|>")
    assert sum(int((w.student_ids == student.eos_token_id).sum()) for w in windows) == len(chats)


def test_missing_chat_template_is_a_user_error(tmp_path, tokenizers):
    student = chat_tokenizer("llama3")
    student.chat_template = None
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"messages": conversation(0)}) + "\n")
    with pytest.raises(
        UserError, match=r"line 1 is chat data but the student tokenizer has no chat template"
    ):
        tokenized_sources([str(path)], student, tokenizers[1])


def test_whitespace_around_content_is_outside_the_alignment_on_both_sides(tokenizers):
    """Llama 3's template trims content and ChatML's does not: both align on the stripped content, and the
    whitespace ChatML keeps before its end-of-turn token is learnt with that token."""
    messages = ({"role": "user", "content": "q"}, {"role": "assistant", "content": "  Spaced answer.\n "})
    _, batch = _batch(tokenizers, [Chat(messages, 0, "row 0")])
    expected = {"student": ["Spaced answer."], "teacher": ["Spaced answer.\n "]}
    for side, tokenizer, end in (
        ("student", tokenizers[0], STUDENT_END),
        ("teacher", tokenizers[1], TEACHER_END),
    ):
        ids, labels = batch.side(side).input_ids[0], batch.side(side).labels[0]
        assert _labelled_text(tokenizer, ids, labels, end) == expected[side]
        grouped = tokenizer.decode(ids[batch.side(side).group[0] >= 0].tolist())
        assert grouped == "Spaced answer."
    assert int(batch.student.target_bytes.sum()) == int(batch.teacher.target_bytes.sum()) == 14


def test_batched_tokenization_equals_one_by_one(tokenizers):
    from sakd.data.chat import tokenize_examples

    examples = [*_chats(7), Completion("Q: tea?\nA:", " Yes.", "row 7")]
    for tokenizer in tokenizers:
        batched = tokenize_examples(tokenizer, examples, "student", batch_size=3)
        for doc, example in zip(batched, examples, strict=True):
            single = tokenize_example(tokenizer, example, "student")
            for field in ("ids", "ends", "nbytes", "target", "content_ends"):
                assert np.array_equal(getattr(doc, field), getattr(single, field)), field


@pytest.mark.parametrize("kind", ["byte_level_trimmed", "metaspace_bpe_bos", "unigram", "wordpiece"])
def test_groups_cover_the_same_content_bytes_for_every_tokenizer_kind(kind, tokenizers):
    import tokenizer_kinds
    from chat_kinds import CHATML

    student = copy.deepcopy(tokenizer_kinds.tokenizer_of(kind))
    student.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    student.chat_template = CHATML
    chats = _chats(5)
    windows, batch = _batch((student, tokenizers[1]), chats)
    contents = [c for chat in chats for c in _contents(chat)]
    assert int(batch.teacher.target_bytes.sum()) == sum(len(c.encode()) for c in contents)
    for w in windows:
        for g in range(int(w.student_group.max()) + 1):
            assert w.student_bytes[w.student_group == g].sum() == w.teacher_bytes[w.teacher_group == g].sum()
        assert w.student_bytes[w.student_target].sum() == w.teacher_bytes[w.teacher_target].sum()


@pytest.mark.parametrize(
    ("template", "message"),
    [
        (
            "{% for m in messages %}{{ m['content'] | upper }}|{% endfor %}",
            "changes an assistant message's text",
        ),
        (
            "{% for m in messages if m['role'] != 'assistant' %}{{ m['content'] }}{% endfor %}",
            "drops assistant",
        ),
        (
            "{{ raise_exception('roles must alternate') }}",
            r"rejects this conversation \(roles must alternate\)",
        ),
    ],
)
def test_templates_that_hide_the_content_are_user_errors(template, message):
    tokenizer = chat_tokenizer("chatml")
    tokenizer.chat_template = template
    with pytest.raises(UserError, match=message) as raised:
        render_chat(tokenizer, _chats(1)[0], "teacher")
    assert "row 0" in str(raised.value) and "teacher" in str(raised.value)


def test_a_gemma_like_template_with_its_own_role_names():
    tokenizer = chat_tokenizer("chatml")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    tokenizer.chat_template = (
        "{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
        "{{ m['content'] }}<end_of_turn>\n{% endfor %}"
    )
    chat = _chats(3)[0]  # two assistant turns
    rendering = render_chat(tokenizer, chat, "student")
    assert [rendering.text[a:b] for a, b in rendering.content] == _contents(chat)
    assert [rendering.text[a:b] for a, b in rendering.turn_ends] == ["<end_of_turn>"] * 2


def test_a_teacher_cache_refuses_chat_data(tmp_path, tokenizers):
    from sakd.cache.keys import keyed_windows

    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"messages": conversation(0)}) + "\n")
    with pytest.raises(UserError, match="teacher cache needs plain text data"):
        keyed_windows([str(path)], *tokenizers, 64)


def test_text_rows_among_chat_rows_keep_every_token_as_target(tmp_path, tokenizers):
    path = tmp_path / "mixed.jsonl"
    rows = [{"messages": conversation(0)}, {"text": "Plain words, all of them learnt."}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    windows = build_windows([str(path)], *tokenizers, max_length=256)
    batch = collate_windows(windows, input_format(tokenizers[0]), input_format(tokenizers[1]))
    labels = batch.student.labels[0]
    text = tokenizers[0].decode(labels[labels != -100].tolist(), skip_special_tokens=False)
    assert text.endswith("Plain words, all of them learnt.<|endoftext|>")
    assert text.startswith(_contents(_chats(1)[0])[0] + STUDENT_END)
