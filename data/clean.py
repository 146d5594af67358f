"""Clean documents: strip HTML, normalize Unicode, drop empty, short and duplicate documents with a reason."""

import hashlib
import html
import re
import unicodedata
import zlib
from collections import Counter

import numpy as np

from data.config import CleanConfig

_SCRIPT = re.compile(r"<(script|style)\b.*?</\1\s*>", re.I | re.S)
_COMMENT = re.compile(r"<!--.*?-->", re.S)
_TAG = re.compile(r"<[^>]{0,2000}>")
_BLANKS = re.compile(r"\n\s*\n\s*\n+")


def strip_html(text: str) -> str:
    text = _COMMENT.sub("", _SCRIPT.sub("", text))
    return _BLANKS.sub("\n\n", html.unescape(_TAG.sub("", text)))


class Cleaner:
    """Stateful across a corpus: remembers what it kept so later duplicates are dropped, first one wins."""

    def __init__(self, cfg: CleanConfig, stats: Counter):
        self.cfg, self.stats = cfg, stats
        self.seen: set[bytes] = set()
        self.near = NearDuplicates(cfg.near_dedup_threshold) if cfg.near_dedup else None

    def __call__(self, text: str, whole: bool) -> str | None:
        """The cleaned text, or None when dropped; `whole` is false for a piece of an over-long document."""
        if self.cfg.strip_html:
            text = strip_html(text)
        if self.cfg.unicode != "none":
            text = unicodedata.normalize(self.cfg.unicode, text)
        if not whole:  # pieces of a split document are kept whole: dropping one would splice the rest
            return text
        if not text.strip():
            return self.drop("empty")
        if len(text) < self.cfg.min_chars:
            return self.drop("too_short")
        if self.cfg.dedup:
            digest = hashlib.blake2b(text.encode(), digest_size=16).digest()
            if digest in self.seen:
                return self.drop("duplicate")
            self.seen.add(digest)
        if self.near is not None and self.near.seen_similar(text):
            return self.drop("near_duplicate")
        return text

    def drop(self, reason: str) -> None:
        self.stats[f"dropped_{reason}"] += 1
        return None


class NearDuplicates:
    """MinHash over word 5-grams with LSH banding: a new document similar to a kept one is a near-duplicate."""

    PERMUTATIONS, BANDS = 64, 8  # 8 bands of 8 rows: candidates from about 0.77 estimated Jaccard
    PRIME = (1 << 61) - 1

    def __init__(self, threshold: float):
        rng = np.random.default_rng(0)  # fixed: the same text must hash the same in every run
        self.a = rng.integers(1, 1 << 31, self.PERMUTATIONS, dtype=np.uint64)
        self.b = rng.integers(0, 1 << 31, self.PERMUTATIONS, dtype=np.uint64)
        self.threshold = threshold
        self.buckets: list[dict[bytes, int]] = [{} for _ in range(self.BANDS)]
        self.signatures: list[np.ndarray] = []

    def signature(self, text: str) -> np.ndarray:
        words = text.split()
        grams = {" ".join(words[i:i + 5]) for i in range(max(1, len(words) - 4))}
        hashes = np.fromiter((zlib.crc32(g.encode()) for g in grams), dtype=np.uint64, count=len(grams))
        # (a*h + b) mod 2^64 is a cheap universal family; 32-bit inputs keep the products well mixed.
        return (hashes[:, None] * self.a[None, :] + self.b[None, :]).min(axis=0)

    def seen_similar(self, text: str) -> bool:
        sig = self.signature(text)
        rows = self.PERMUTATIONS // self.BANDS
        keys = [sig[i * rows:(i + 1) * rows].tobytes() for i in range(self.BANDS)]
        for band, key in enumerate(keys):
            other = self.buckets[band].get(key)
            if other is not None and np.mean(self.signatures[other] == sig) >= self.threshold:
                return True
        index = len(self.signatures)
        self.signatures.append(sig)
        for band, key in enumerate(keys):
            self.buckets[band].setdefault(key, index)
        return False
