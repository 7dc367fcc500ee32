"""sakd: Student-Aware Knowledge Distillation of causal language models."""

__version__ = "0.1.0"
