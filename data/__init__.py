"""Corpora, tokenizers, packing and resumable per-rank loading; knows nothing of losses."""
