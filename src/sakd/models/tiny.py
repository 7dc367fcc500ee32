"""Small models and tokenizers built offline: the demo's teacher and student, and the test fixtures.

Two byte-level BPE tokenizers that split text differently (so their token boundaries disagree, as Qwen's and
SmolLM's do), a Qwen3-MoE-style teacher and a Llama-style student, all from configs; and a tiny random model of
each real family in `FAMILIES` (`tiny_family_model`), keeping what sets the family apart.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    CohereConfig,
    Gemma2Config,
    Gemma3TextConfig,
    GPT2Config,
    GraniteConfig,
    LlamaConfig,
    MistralConfig,
    Olmo2Config,
    Phi3Config,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
    Qwen3MoeConfig,
)

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


# Shared by the Llama-like families: 2 layers, 4 query heads of 8 dimensions sharing 2 key/value heads.
_HIDDEN, _LAYERS, _HEADS, _KV_HEADS, _FFN, _POSITIONS = 32, 2, 4, 2, 64, 256
# Wider than the real models' 0.02, so that a tiny model's logits spread over a few units and each family's
# logit transforms (softcapping, scales) change its distributions visibly.
_INIT_STD = 0.2
# The token ids of the real families' configs (Cohere's EOS is 255001) fall outside a tiny vocabulary.
_NO_SPECIAL_IDS = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}


def _decoder(**family: Any) -> dict[str, Any]:
    """Keyword arguments of a tiny Llama-like decoder, then the family's own (which win)."""
    return {
        "hidden_size": _HIDDEN,
        "intermediate_size": _FFN,
        "num_hidden_layers": _LAYERS,
        "num_attention_heads": _HEADS,
        "num_key_value_heads": _KV_HEADS,
        "max_position_embeddings": _POSITIONS,
        "initializer_range": _INIT_STD,
        **_NO_SPECIAL_IDS,
        **family,
    }


def _gemma(config_class: type[PretrainedConfig], vocab_size: int) -> PretrainedConfig:
    """Gemma 2 and 3: alternating sliding/full attention, a head size apart from hidden / heads, and
    softcapping small enough to bend a tiny model's logits (the real models use 30)."""
    return config_class(
        vocab_size=vocab_size,
        **_decoder(
            head_dim=16,
            query_pre_attn_scalar=16,
            sliding_window=16,
            layer_types=["sliding_attention", "full_attention"],
            final_logit_softcapping=2.0,
            attn_logit_softcapping=50.0,
            tie_word_embeddings=True,
        ),
    )


def _family_configs() -> dict[str, Callable[[int], PretrainedConfig]]:
    """Family name -> a function of the vocabulary size giving that family's tiny config."""
    return {
        "llama": lambda v: LlamaConfig(vocab_size=v, **_decoder(tie_word_embeddings=False)),
        "mistral": lambda v: MistralConfig(
            vocab_size=v, **_decoder(sliding_window=32, tie_word_embeddings=False)
        ),
        "gemma2": lambda v: _gemma(Gemma2Config, v),
        "gemma3_text": lambda v: _gemma(Gemma3TextConfig, v),
        # Qwen2 has biases on the query, key and value projections (built into the architecture).
        "qwen2": lambda v: Qwen2Config(vocab_size=v, **_decoder(tie_word_embeddings=True)),
        # Qwen3: query/key norms, and a head size not tied to hidden / heads.
        "qwen3": lambda v: Qwen3Config(vocab_size=v, **_decoder(head_dim=16, tie_word_embeddings=True)),
        "qwen3_moe": lambda v: Qwen3MoeConfig(
            vocab_size=v,
            **_decoder(
                head_dim=16,
                num_experts=4,
                num_experts_per_tok=2,
                moe_intermediate_size=32,
                norm_topk_prob=True,
                router_aux_loss_coef=0.01,
                tie_word_embeddings=False,
            ),
        ),
        # Phi-3: fused query/key/value and gate/up projections.
        "phi3": lambda v: Phi3Config(vocab_size=v, **_decoder(tie_word_embeddings=False)),
        "gpt2": lambda v: GPT2Config(
            vocab_size=v,
            n_embd=_HIDDEN,
            n_layer=_LAYERS,
            n_head=_HEADS,
            n_positions=_POSITIONS,  # learned position embeddings
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            initializer_range=_INIT_STD,
            tie_word_embeddings=True,
            **_NO_SPECIAL_IDS,
        ),
        # OLMo 2: norms after attention and MLP (not before), query/key norms.
        "olmo2": lambda v: Olmo2Config(vocab_size=v, **_decoder(tie_word_embeddings=False)),
        # Granite 3's multipliers: embeddings scaled up, residual branches scaled down, attention scores over
        # head size (not its square root), logits divided by `logits_scaling`.
        "granite": lambda v: GraniteConfig(
            vocab_size=v,
            **_decoder(
                embedding_multiplier=12.0,
                residual_multiplier=0.22,
                attention_multiplier=0.125,
                logits_scaling=4.0,
                tie_word_embeddings=True,
            ),
        ),
        # Cohere (Command R): parallel attention and MLP on one layer norm, logits multiplied by `logit_scale`.
        "cohere": lambda v: CohereConfig(
            vocab_size=v, **_decoder(logit_scale=0.25, tie_word_embeddings=True)
        ),
    }


FAMILIES: tuple[str, ...] = tuple(_family_configs())


def tiny_family_config(family: str, vocab_size: int) -> PretrainedConfig:
    """The tiny config of `family` (one of `FAMILIES`): the family's own config class, hidden size 32, 2 layers,
    no special token ids (set them on the config to match a tokenizer)."""
    builders = _family_configs()
    if family not in builders:
        raise ValueError(f"unknown family '{family}': one of {', '.join(FAMILIES)}")
    return builders[family](vocab_size)


def tiny_family_model(family: str, vocab_size: int, seed: int = 0) -> PreTrainedModel:
    """A random causal LM of `family` with `vocab_size` tokens; the same seed gives the same weights."""
    config = tiny_family_config(family, vocab_size)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)
