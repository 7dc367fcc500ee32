"""Small models and tokenizers built offline: the demo's teacher and student, and the test fixtures.

Two byte-level BPE tokenizers that split text differently (so their token boundaries disagree, as Qwen's and
SmolLM's do), a Qwen3-MoE-style teacher and a Llama-style student, all from configs.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, PreTrainedTokenizerFast, Qwen3MoeConfig

EOS = "<|endoftext|>"
PAD = "<|pad|>"

# GPT-2's pre-tokenizer attaches a leading space to words; the other one isolates whitespace runs, digits and
# punctuation, so the two tokenizations share only some boundaries.
_SPLITS = {
    "gpt2": pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    "isolated": pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"\s+|\d|[^\s\w]"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    ),
}


def train_tokenizer(texts: Iterable[str], vocab_size: int, split: str = "gpt2") -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (no unknown tokens) trained on `texts`; offsets are not trimmed."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = _SPLITS[split]
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD)


def moe_teacher_config(
    vocab_size: int,
    hidden_size: int = 256,
    layers: int = 4,
    heads: int = 8,
    experts: int = 8,
    experts_per_token: int = 2,
    max_length: int = 1024,
) -> Qwen3MoeConfig:
    head_dim = hidden_size // heads
    return Qwen3MoeConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        moe_intermediate_size=hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        head_dim=head_dim,
        num_experts=experts,
        num_experts_per_tok=experts_per_token,
        max_position_embeddings=max_length,
        tie_word_embeddings=False,
        router_aux_loss_coef=0.01,
    )


def dense_student_config(
    vocab_size: int, hidden_size: int = 128, layers: int = 4, heads: int = 4, max_length: int = 1024
) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 3,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_length,
        tie_word_embeddings=True,
    )
