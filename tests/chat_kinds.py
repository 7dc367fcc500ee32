"""Two tiny chat tokenizers with different templates and special tokens, and conversations to train on.

`chatml` (Qwen style: `<|im_start|>role\\n...<|im_end|>\\n`) and `llama3` (Llama 3 style: a BOS its
post-processor adds, header tokens, `<|eot_id|>`, content trimmed by the template), on byte-level BPE
tokenizers that split text differently.
"""

from __future__ import annotations

import copy
import json
from functools import cache
from pathlib import Path

from tokenizers import processors
from transformers import PreTrainedTokenizerFast

from sakd.models.tiny import train_tokenizer

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>"
    "\n\n{{ message['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)

TOPICS = ["tea", "rivers", "café au lait", "日本語", "prime numbers", "the moon 🙂", "bridges", "owls"]


def conversation(i: int) -> list[dict[str, str]]:
    """A short conversation, some with a system message and two turns."""
    topic = TOPICS[i % len(TOPICS)]
    messages = [{"role": "system", "content": f"You are terse. Rule {i}."}] if i % 2 else []
    messages += [
        {"role": "user", "content": f"Tell me about {topic}, please ({i})."},
        {"role": "assistant", "content": f"{topic.capitalize()} are worth a look; fact number {i * 7}."},
    ]
    if i % 3 == 0:
        messages += [
            {"role": "user", "content": "And more?"},
            {"role": "assistant", "content": f"Yes: {topic} again, with {i} details."},
        ]
    return messages


def corpus() -> list[str]:
    lines = []
    for i in range(40):
        lines += [m["content"] for m in conversation(i)]
    return lines * 3


@cache
def chatml() -> PreTrainedTokenizerFast:
    tok = train_tokenizer(corpus(), 400, split="gpt2")
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML
    return tok


@cache
def llama3() -> PreTrainedTokenizerFast:
    tok = train_tokenizer(corpus(), 360, split="isolated")
    specials = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tok.add_special_tokens({"bos_token": specials[0], "additional_special_tokens": specials[1:]})
    bos = tok.convert_tokens_to_ids(specials[0])
    tok.backend_tokenizer.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single=f"{specials[0]} $A", special_tokens=[(specials[0], bos)]),
        ]
    )
    tok.chat_template = LLAMA3
    return tok


def chat_tokenizer(kind: str) -> PreTrainedTokenizerFast:
    """A fresh copy, so that a test may change it."""
    return copy.deepcopy({"chatml": chatml, "llama3": llama3}[kind]())


def write_chat_jsonl(path: Path, count: int = 24, start: int = 0) -> Path:
    with path.open("w") as f:
        for i in range(start, start + count):
            f.write(json.dumps({"messages": conversation(i)}) + "\n")
    return path
