"""Data: text sources, tokenization with offsets, alignment groups, packed windows and their loader."""

from sakd.data.align import alignment_groups
from sakd.data.batch import Alignment, Batch, CachedTargets, LossRows, Side
from sakd.data.loader import WindowLoader
from sakd.data.packing import Window, collate_windows, pack_windows
from sakd.data.sources import load_documents, load_sources
from sakd.data.tokenize import TokenizedDoc, require_offsets, tokenize_documents

__all__ = [
    "Alignment",
    "Batch",
    "CachedTargets",
    "LossRows",
    "Side",
    "TokenizedDoc",
    "Window",
    "WindowLoader",
    "alignment_groups",
    "collate_windows",
    "load_documents",
    "load_sources",
    "pack_windows",
    "require_offsets",
    "tokenize_documents",
]
