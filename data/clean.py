"""Clean documents: strip HTML, normalize Unicode, drop empty, short and duplicate documents with a reason."""

import hashlib
import re
import unicodedata
from collections import Counter
from functools import partial

import numpy as np

from data.config import CleanConfig

# A document is HTML when its first tag-like text, after leading whitespace, is an HTML doctype or the opening
# tag of a known HTML element. Code (`if a<b and c>d:`), plain text and math never start that way, so they are
# left byte-identical; a web page, or a fragment starting with <p>, <div>, <br> and the like, is parsed.
HTML_ELEMENTS = ("html", "head", "body", "title", "meta", "link", "p", "div", "span", "br", "hr", "a", "b", "i",
                 "em", "strong", "h1", "h2", "h3", "h4", "h5", "h6", "ul", "ol", "li", "dl", "dt", "dd", "table",
                 "thead", "tbody", "tr", "th", "td", "pre", "code", "blockquote", "section", "article", "header",
                 "footer", "nav", "main", "aside", "figure", "figcaption", "img", "form", "script", "style",
                 "noscript")
_HTML_START = re.compile(rf"\s*(?:<!doctype\s+html\b|<(?:{'|'.join(HTML_ELEMENTS)})(?:\s[^<>]*)?/?>)", re.I)
SKIPPED = {"script", "style", "noscript", "template", "svg", "iframe", "object", "head"}
PARAGRAPH_TAGS = {"p", "div", "section", "article", "header", "footer", "nav", "main", "aside", "blockquote",
                  "pre", "table", "ul", "ol", "dl", "figure", "figcaption", "form", "hr", "address", "fieldset",
                  "h1", "h2", "h3", "h4", "h5", "h6", "details", "summary", "body"}
LINE_TAGS = {"br", "li", "tr", "dt", "dd", "caption", "option"}
CELL_TAGS = {"td", "th"}
VERBATIM_TAGS = {"pre", "textarea"}
# Markers while walking the tree; control characters that cannot survive in extracted text.
_LINE, _PARAGRAPH, _KEPT_SPACE = "\x00", "\x01", "\x02"
_BREAKS = re.compile(r" *[\x00\x01][\x00\x01 ]*")
_SPACES = re.compile(r"\s+")
_RUNS_OF_SPACES = re.compile(r"  +")  # spaces kept verbatim in <pre> are _KEPT_SPACE until the end


def is_html(text: str) -> bool:
    """True for a document that starts (after whitespace) with a doctype or a known HTML element's tag."""
    return _HTML_START.match(text) is not None


def strip_html(text: str) -> str:
    """The visible text of an HTML document; any other document is returned unchanged.

    Only documents `is_html` accepts are parsed (with lexbor, through selectolax). Scripts, styles and
    noscript are removed; entities are unescaped; whitespace is collapsed as a browser would, except inside
    <pre>; block elements become paragraphs (a blank line), list items, rows and <br> become line breaks.
    """
    if not is_html(text):
        return text
    from selectolax.lexbor import LexborHTMLParser

    tree = LexborHTMLParser(text)
    root = tree.body or tree.root
    text = _BREAKS.sub(_join_breaks, "".join(_visible_pieces(root)))
    return _RUNS_OF_SPACES.sub(" ", text).strip().replace(_KEPT_SPACE, " ")


def _visible_pieces(root):
    """Text and break markers of the tree under `root`, in document order (an explicit stack: pages can nest
    deeper than Python's recursion limit)."""
    stack = [(root, False)]
    while stack:
        node, verbatim = stack.pop()
        if isinstance(node, str):
            yield node
        elif node.is_text_node:
            text = re.sub(r"[\x00-\x02]", "", node.text_content or "")
            yield text.replace(" ", _KEPT_SPACE) if verbatim else _SPACES.sub(" ", text)
        elif node.is_element_node and node.tag not in SKIPPED:
            tag = node.tag
            mark = (_PARAGRAPH if tag in PARAGRAPH_TAGS else _LINE if tag in LINE_TAGS
                    else " " if tag in CELL_TAGS else "")
            inner = verbatim or tag in VERBATIM_TAGS
            stack.append((mark, inner))
            stack.extend((child, inner) for child in reversed(list(node.iter(include_text=True))))
            yield mark


def _join_breaks(match: re.Match) -> str:
    return "\n\n" if _PARAGRAPH in match.group() else "\n"


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
    """datasketch MinHash over word 5-grams, indexed by MinHashLSH: a document whose estimated Jaccard
    similarity to an earlier kept one reaches `threshold` is a near-duplicate (the first one wins)."""

    NUM_PERM, SEED, SHINGLE_WORDS = 128, 1, 5  # fixed seed: the same text hashes the same in every run

    def __init__(self, threshold: float):
        from datasketch import MinHash, MinHashLSH

        self.threshold = threshold
        self.lsh = MinHashLSH(threshold=threshold, num_perm=self.NUM_PERM)
        # Permutations are drawn once; each document's MinHash reuses them instead of drawing its own.
        template = MinHash(num_perm=self.NUM_PERM, seed=self.SEED)
        self._new = partial(MinHash, num_perm=self.NUM_PERM, seed=self.SEED, permutations=template.permutations,
                            scheme=template.scheme)
        self.kept: list[np.ndarray] = []

    def minhash(self, text: str):
        words = text.split()
        n = self.SHINGLE_WORDS
        shingles = {" ".join(words[i:i + n]).encode() for i in range(max(1, len(words) - n + 1))}
        sketch = self._new()
        sketch.update_batch(shingles)
        return sketch

    def seen_similar(self, text: str) -> bool:
        sketch = self.minhash(text)
        # LSH candidates share a band; only an estimated similarity at the threshold makes a duplicate.
        if any(np.mean(self.kept[key] == sketch.hashvalues) >= self.threshold for key in self.lsh.query(sketch)):
            return True
        self.lsh.insert(len(self.kept), sketch, check_duplication=False)
        self.kept.append(sketch.hashvalues.astype(np.uint32))
        return False
