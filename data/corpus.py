"""Documents for training: the embedded default corpus and the seeded train/validation split."""

import hashlib

EMBEDDED_NAME = "pydoc_data.topics"


def embedded_documents() -> list[str]:
    """The Python language reference shipped inside CPython: ~465 KB of real English, no download."""
    from pydoc_data.topics import topics

    return [topics[key] for key in sorted(topics)]


def split_documents(docs: list[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Hold out whole documents by a seeded hash, so the split is stable when the corpus grows."""
    n_val = max(1, round(len(docs) * val_fraction))
    ranked = sorted(range(len(docs)), key=lambda i: hashlib.sha256(f"{seed}:{docs[i]}".encode()).digest())
    val_ids = set(ranked[:n_val])
    train = [d for i, d in enumerate(docs) if i not in val_ids]
    val = [d for i, d in enumerate(docs) if i in val_ids]
    return train, val
