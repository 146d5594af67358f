"""How documents become training samples: the shapes an objective can ask data preparation for.

A sample is a dict of named 1-D arrays (`input_ids`, and e.g. `token_type_ids`, `next_sentence_label`),
stored in the shards as one WebDataset member per field. The objective names a `SampleSpec`; preparation
builds samples to it and knows nothing of losses. Builders see tokenized pieces in source order: `flat`
holds the pieces' ids back to back, `lengths` says where each ends, and `conts[i]` is True when piece i
continues in the next one (the same document); a document ends at the first piece with cont False.
"""

from dataclasses import asdict, dataclass
from typing import Protocol

import numpy as np

from data.packing import StreamPacker

SAMPLE_KINDS = ("blocks", "pairs", "segments")
SEGMENTATIONS = ("none", "sentences")


@dataclass(frozen=True)
class SampleSpec:
    # blocks: documents packed into seq_len blocks (or one per document with data.packed=false);
    # pairs: BERT next-sentence pairs; segments: one sample per sentence (sentence encoders)
    kind: str = "blocks"
    separator: str = "eos"  # the token between packed documents: eos (decoders) or sep (encoders)
    wrap: bool = False  # every sample is [CLS] ... [SEP], as BERT-style encoders expect
    segments: str = "none"  # sentences: documents are cut into sentences before tokenizing
    sentinels: int = 0  # T5-style <extra_id_N> tokens the tokenizer must hold (span corruption)
    special_tokens: tuple[str, ...] = ()  # special tokens the tokenizer must hold: mask, cls, sep
    # pairs only: share whose second segment is from another document, and of shorter-than-budget pairs
    random_next_prob: float = 0.5
    short_seq_prob: float = 0.1

    def key(self) -> dict | None:
        """What goes into the prepared data's cache key; None for causal LM blocks, so corpora prepared
        before samples had a spec keep their key (and their runs stay resumable)."""
        return None if self == SampleSpec() else asdict(self)


CAUSAL_BLOCKS = SampleSpec()  # what every corpus held before objectives chose their samples


class SampleBuilder(Protocol):
    fields: dict[str, str]  # field name -> "ids" (stored in the token dtype) or a numpy dtype name

    def add(self, flat: np.ndarray, lengths: np.ndarray, conts: np.ndarray) -> list[dict[str, np.ndarray]]: ...

    def finish(self) -> tuple[list[dict[str, np.ndarray]], int]:
        """Samples still held, and the number of tokens dropped because they made no sample."""
        ...


class BlockBuilder:
    """Packed blocks (or single documents), optionally wrapped in [CLS] ... [SEP]."""

    fields = {"input_ids": "ids"}

    def __init__(self, seq_len: int, separator_id: int | None, packed: bool, wrap: tuple[int, int] | None = None):
        self.wrap = wrap
        self.packer = StreamPacker(seq_len - (2 if wrap else 0), separator_id, packed)

    def _sample(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        if self.wrap:
            ids = np.concatenate([[self.wrap[0]], ids, [self.wrap[1]]]).astype(np.int64)
        return {"input_ids": ids}

    def add(self, flat, lengths, conts):
        return [self._sample(block) for block in self.packer.add(flat, lengths, conts)]

    def finish(self):
        return [], self.packer.finish()
