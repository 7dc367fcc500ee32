"""Distillation and language-modelling losses: pure functions, fp32 inside, per-row or summed."""

from sakd.losses.chunked import ChunkBuffers, Chunking, chunk_rows, chunked_head_loss, full_head_loss
from sakd.losses.cross_vocab import (
    CROSS_VOCAB_LOSSES,
    hybrid_loss,
    projected_divergence,
    projected_teacher_probs,
    uld_loss,
)
from sakd.losses.divergence import (
    DIVERGENCES,
    divergence,
    divergence_from_logprobs,
    forward_kl,
    generalized_jsd,
    reverse_kl,
    student_logprobs_at,
    total_variation,
)
from sakd.losses.rows import IGNORE_INDEX, lm_row_loss, make_distill_row_loss
from sakd.losses.vocab_mapping import VocabMapping, build_vocab_mapping, token_surfaces

__all__ = [
    "ChunkBuffers",
    "Chunking",
    "chunk_rows",
    "CROSS_VOCAB_LOSSES",
    "DIVERGENCES",
    "IGNORE_INDEX",
    "VocabMapping",
    "build_vocab_mapping",
    "chunked_head_loss",
    "divergence",
    "divergence_from_logprobs",
    "forward_kl",
    "full_head_loss",
    "generalized_jsd",
    "hybrid_loss",
    "lm_row_loss",
    "make_distill_row_loss",
    "projected_divergence",
    "projected_teacher_probs",
    "reverse_kl",
    "student_logprobs_at",
    "token_surfaces",
    "total_variation",
    "uld_loss",
]
