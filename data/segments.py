"""Sentence-level samples: sentence splitting, BERT next-sentence pairs and one-sentence samples.

Preparation cuts each document into sentences (`split_sentences`) and tokenizes them as pieces of one
document (cont True on all but the last), so the builders here see one sentence per piece.
"""

import re
from collections import deque

import numpy as np

from common.errors import LmforgeError

# A regex rather than NLTK's punkt: punkt downloads its model at run time, which offline clusters cannot do,
# and NSP only needs plausible sentence boundaries, not perfect ones. The cost is known: an abbreviation
# followed by a capitalised word ("Dr. Smith") is cut in two.
_END = re.compile(r"[.!?]+[\"'”’»)\]]*\s+")
_OPENERS = "\"'“‘«(["


def split_sentences(text: str) -> list[str]:
    """Sentences of `text`: every line break ends one, and so does ., ! or ? (with any closing quotes or
    brackets) followed by whitespace and then an upper-case letter, a digit or an opening quote."""
    sentences = []
    for line in text.splitlines():
        start = 0
        for end in _END.finditer(line):
            following = line[end.end():end.end() + 1]
            if following and (following.isupper() or following.isdigit() or following in _OPENERS):
                sentences.append(line[start:end.end()].strip())
                start = end.end()
        sentences.append(line[start:].strip())
    return [s for s in sentences if s]


def _pieces(flat: np.ndarray, lengths: np.ndarray):
    ends = np.cumsum(lengths)
    return (flat[end - length:end].astype(np.int64) for end, length in zip(ends, lengths))


class PairBuilder:
    """BERT next-sentence-prediction pairs, [CLS] A [SEP] B [SEP], following create_instances_from_document
    in google-research/bert's create_pretraining_data.py.

    Segments of a document are gathered until a target length is reached; A is a random number of the
    leading ones. B is the rest (next_sentence_label 0) or, with probability `random_next_prob`, a run of
    segments from a random earlier document (label 1), in which case the unused segments go back to start
    the next pair. Earlier documents are kept in a bounded pool (the stream is too large to hold), so
    "random" means random among the last `pool_documents`.

    A chunk of one segment has no true next. BERT makes every such pair random, which on corpora of short
    documents (or after segments are put back) pushes the random share well past `random_next_prob` (62%
    instead of 50% on the tests' corpus). Two changes keep the share at `random_next_prob`: a one-segment
    chunk drawn as a true pair takes the document's next segment into it when there is one; and each pair
    drawn as true but forced to be random all the same (a one-sentence document, the last segment left over)
    is made up for by turning the next pair drawn as random into a true one.
    """

    fields = {"input_ids": "ids", "token_type_ids": "uint8", "next_sentence_label": "uint8"}

    def __init__(self, seq_len: int, cls_id: int, sep_id: int, random_next_prob: float = 0.5,
                 short_seq_prob: float = 0.1, seed: int = 0, pool_documents: int = 1000):
        if seq_len < 5:
            raise LmforgeError(f"data.seq_len={seq_len} is too short for sentence pairs: [CLS] A [SEP] B [SEP] "
                               "needs at least 5 tokens")
        self.max_tokens = seq_len - 3  # room for [CLS] and two [SEP]s
        self.cls_id, self.sep_id = cls_id, sep_id
        self.random_next_prob, self.short_seq_prob = random_next_prob, short_seq_prob
        # Preparation feeds builders one batch after another in source order, so one generator is enough
        # for the same data and seed to give the same pairs.
        self.rng = np.random.default_rng(seed)
        self.pool: deque[list[np.ndarray]] = deque(maxlen=pool_documents)
        self.document: list[np.ndarray] = []
        self.dropped = 0
        self.owed_true = 0  # pairs drawn as true that had to be random

    def add(self, flat, lengths, conts):
        samples = []
        for piece, cont in zip(_pieces(flat, lengths), conts):
            if len(piece):
                self.document.append(piece)
            if not cont:
                samples.extend(self._document(self.document))
                self.document = []
        return samples

    def finish(self):
        # A stream that ends inside a document still ends that document.
        samples = self._document(self.document)
        self.document = []
        return samples, self.dropped

    def _target_length(self) -> int:
        # Mostly full pairs (shorter ones waste the padding), but sometimes short ones, so the model also
        # sees the lengths fine-tuning will give it. Drawn per pair.
        if self.rng.random() < self.short_seq_prob:
            return int(self.rng.integers(2, self.max_tokens + 1))
        return self.max_tokens

    def _document(self, segments: list[np.ndarray]) -> list[dict[str, np.ndarray]]:
        samples, chunk, chunk_length, target, i = [], [], 0, self._target_length(), 0
        while i < len(segments):
            chunk.append(segments[i])
            chunk_length += len(segments[i])
            if i == len(segments) - 1 or chunk_length >= target:
                drawn_random = self.rng.random() < self.random_next_prob
                if not drawn_random and len(chunk) == 1 and i + 1 < len(segments):
                    i += 1  # a true pair needs a second segment; truncation keeps the pair in budget
                    chunk.append(segments[i])
                random_next = self._random_next_label(drawn_random, len(chunk))
                a_end = int(self.rng.integers(1, len(chunk))) if len(chunk) >= 2 else 1
                a = np.concatenate(chunk[:a_end])
                if random_next is None:  # one segment, and no earlier document to pair it with
                    self.dropped += len(a)
                elif random_next:
                    b = self._random_next(target - len(a))
                    i -= len(chunk) - a_end  # the segments B did not use start the next pair
                    samples.append(self._pair(a, b, 1, own_b=False))
                else:
                    samples.append(self._pair(a, np.concatenate(chunk[a_end:]), 0, own_b=True))
                chunk, chunk_length, target = [], 0, self._target_length()
            i += 1
        if segments:
            self.pool.append(segments)
        return samples

    def _random_next_label(self, drawn_random: bool, chunk_segments: int) -> bool | None:
        """Whether B comes from another document: as drawn, unless the chunk cannot make the drawn pair (one
        segment: random; no earlier document yet, in the very first one: true, or None when that is
        impossible too) or a true pair is owed for an earlier forced random one."""
        if not self.pool:
            return False if chunk_segments >= 2 else None
        if chunk_segments == 1:
            self.owed_true += not drawn_random
            return True
        if drawn_random and self.owed_true:
            self.owed_true -= 1
            return False
        return drawn_random

    def _random_next(self, target_length: int) -> np.ndarray:
        """Segments of a random earlier document, from a random one on, until `target_length` tokens."""
        document = self.pool[int(self.rng.integers(len(self.pool)))]
        taken, length = [], 0
        for segment in document[int(self.rng.integers(len(document))):]:
            taken.append(segment)
            length += len(segment)
            if length >= target_length:
                break
        return np.concatenate(taken)

    def _pair(self, a: np.ndarray, b: np.ndarray, label: int, own_b: bool) -> dict[str, np.ndarray]:
        a, b = self._truncate(a, b, own_b)
        input_ids = np.concatenate([[self.cls_id], a, [self.sep_id], b, [self.sep_id]]).astype(np.int64)
        token_type_ids = np.zeros(len(input_ids), dtype=np.uint8)
        token_type_ids[len(a) + 2:] = 1
        return {"input_ids": input_ids, "token_type_ids": token_type_ids,
                "next_sentence_label": np.array([label], dtype=np.uint8)}

    def _truncate(self, a: np.ndarray, b: np.ndarray, own_b: bool) -> tuple[np.ndarray, np.ndarray]:
        """BERT's truncate_seq_pair: while the pair is too long, drop a token from the longer side (B on a
        tie), from its front or back at random, so neither end is always the one lost. Computed in closed
        form rather than token by token: the longer side first loses the difference, then the two sides
        alternate starting with B; each side's front/back split is a fair binomial draw."""
        excess = len(a) + len(b) - self.max_tokens
        if excess <= 0:
            return a, b
        gap = min(abs(len(a) - len(b)), excess)
        rest = excess - gap
        cut_a = (gap if len(a) > len(b) else 0) + rest // 2
        cut_b = (gap if len(b) >= len(a) else 0) + rest - rest // 2
        self.dropped += cut_a + (cut_b if own_b else 0)  # a random B's tokens belong to another document
        return self._cut(a, cut_a), self._cut(b, cut_b)

    def _cut(self, tokens: np.ndarray, count: int) -> np.ndarray:
        if count == 0:
            return tokens
        front = int(self.rng.binomial(count, 0.5))
        return tokens[front:len(tokens) - (count - front)]


class SegmentBuilder:
    """One sample per piece (sentence): [CLS] ids [SEP], cut to seq_len. Pieces shorter than `min_tokens`
    carry too little to embed and are dropped; their tokens, and those cut off long pieces, are counted."""

    fields = {"input_ids": "ids"}

    def __init__(self, seq_len: int, cls_id: int, sep_id: int, min_tokens: int = 4):
        if seq_len < 3:
            raise LmforgeError(f"data.seq_len={seq_len} is too short for [CLS] sentence [SEP]; use at least 3")
        self.keep, self.cls_id, self.sep_id, self.min_tokens = seq_len - 2, cls_id, sep_id, min_tokens
        self.dropped = 0

    def add(self, flat, lengths, conts):
        samples = []
        for piece in _pieces(flat, lengths):
            if len(piece) < self.min_tokens:
                self.dropped += len(piece)
                continue
            self.dropped += max(len(piece) - self.keep, 0)
            samples.append({"input_ids": np.concatenate([[self.cls_id], piece[:self.keep], [self.sep_id]])})
        return samples

    def finish(self):
        return [], self.dropped
