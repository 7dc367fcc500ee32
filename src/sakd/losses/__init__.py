"""Distillation and language-modelling losses: pure functions, fp32 inside, per-row or summed."""

from sakd.losses.chunk_likelihood import chunk_likelihood_loss, chunk_logprobs, label_groups
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
    akl_logprobs,
    divergence,
    divergence_from_logprobs,
    forward_kl,
    generalized_jsd,
    reverse_kl,
    student_logprobs_at,
    taid_logprobs,
    total_variation,
)
from sakd.losses.rows import IGNORE_INDEX, lm_row_loss, make_distill_row_loss
from sakd.losses.taid import TAIDSchedule
from sakd.losses.vocab_mapping import VocabMapping, build_vocab_mapping, token_surfaces

__all__ = [
    "TAIDSchedule",
    "akl_logprobs",
    "chunk_likelihood_loss",
    "chunk_logprobs",
    "label_groups",
    "taid_logprobs",
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
