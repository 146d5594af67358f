"""Masked language modelling (BERT): predict a random 15% of the tokens from the rest of the block."""

import math
from collections.abc import Sequence

import numpy as np
import torch

from common.errors import LmforgeError
from data.samples import SampleSpec
from model.objectives.base import IGNORE_INDEX, Objective, pad_stack, token_loss_sums

MASK_SHARE, RANDOM_SHARE = 0.8, 0.1  # of the selected tokens; the remaining 10% stay as they are


def random_plain_ids(rng: np.random.Generator, count: int, vocab_size: int, special: np.ndarray) -> np.ndarray:
    """`count` ids drawn uniformly from [0, vocab_size) without the sorted, unique `special` ids.

    Drawing v from the vocabulary less the specials and shifting it past every special id at or below it
    avoids building (and scanning) a vocabulary-sized table for each sample.
    """
    draws = rng.integers(0, vocab_size - len(special), size=count)
    return draws + np.searchsorted(special - np.arange(len(special)), draws, side="right")


def mask_tokens(ids: np.ndarray, rng: np.random.Generator, special: Sequence[int] | np.ndarray, mask_id: int,
                vocab_size: int, mask_prob: float, word_starts: np.ndarray | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
    """BERT's masking of one sample: (inputs, labels), int64 arrays shaped like `ids`.

    `special`: ids never selected nor drawn as random replacements (every special token and the padding).
    Exactly round(mask_prob * candidates) of the non-special tokens are selected (at least one when there is
    any), so every sample is masked at the configured rate rather than only on average. With `word_starts`
    (a boolean table indexed by token id: True where a token begins a word) whole words are selected, all
    of their subword tokens together, in random order until the token budget is met: a word that would go
    past the budget is skipped, as in BERT's create_masked_lm_predictions. Of the selected tokens, 80%
    become `mask_id`, 10% a random non-special id and 10% stay unchanged (drawn per token), so the model
    cannot rely on [MASK] marking the only positions it is asked about. Labels hold the original id at
    selected positions and IGNORE_INDEX elsewhere.
    """
    ids = np.asarray(ids, dtype=np.int64)
    special = np.unique(np.asarray(special, dtype=np.int64))
    special = special[(special >= 0) & (special < vocab_size)]
    candidates = np.flatnonzero(~np.isin(ids, special))
    labels = np.full_like(ids, IGNORE_INDEX)
    if len(candidates) == 0:
        return ids.copy(), labels
    budget = max(1, int(round(mask_prob * len(candidates))))
    if word_starts is None:
        selected = np.sort(rng.choice(candidates, size=budget, replace=False))
    else:
        selected = _whole_words(ids, candidates, rng, budget, word_starts)
    labels[selected] = ids[selected]
    inputs = ids.copy()
    action = rng.random(len(selected))
    replacements = random_plain_ids(rng, len(selected), vocab_size, special)
    masked, randomised = action < MASK_SHARE, (action >= MASK_SHARE) & (action < MASK_SHARE + RANDOM_SHARE)
    inputs[selected[masked]] = mask_id
    inputs[selected[randomised]] = replacements[randomised]
    return inputs, labels


def _whole_words(ids, candidates, rng, budget, word_starts) -> np.ndarray:
    """Candidate positions of randomly chosen whole words totalling at most `budget` tokens (at least one
    word). A token begins a word where the table says so, and also right after a special token or a gap, so
    a word never spans a [SEP] and a document's first word is whole even without a word-start marker."""
    table = np.asarray(word_starts, dtype=bool)
    token_ids = ids[candidates]
    starts = np.ones(len(candidates), dtype=bool)
    known = token_ids < len(table)
    starts[known] = table[token_ids[known]]
    starts[0] = True
    starts[1:] |= np.diff(candidates) != 1
    word_of = np.cumsum(starts) - 1
    word_lengths = np.bincount(word_of)
    chosen, total = [], 0
    for word in rng.permutation(len(word_lengths)):
        if total + word_lengths[word] <= budget:
            chosen.append(word)
            total += word_lengths[word]
            if total == budget:
                break
    if not chosen:  # every word is longer than the budget: predict one rather than none
        chosen = [int(rng.integers(len(word_lengths)))]
    return candidates[np.isin(word_of, chosen)]


def word_start_table(tokenizer, size: int, special_ids: Sequence[int] = ()) -> np.ndarray:
    """True for each token id < `size` that begins a word, from the tokenizer's subword convention:
    WordPiece (and BPE with a continuing-subword prefix) marks continuations ("##"); byte-level BPE marks
    word-initial tokens with "Ġ" and Metaspace (SentencePiece) ones with "▁". Special tokens and ids the
    tokenizer does not know begin words."""
    vocab = tokenizer.get_vocab()
    model = getattr(getattr(tokenizer, "backend_tokenizer", None), "model", None)
    prefix = getattr(model, "continuing_subword_prefix", None)
    table = np.ones(size, dtype=bool)
    if prefix:
        for token, i in vocab.items():
            if i < size and token.startswith(prefix):
                table[i] = False
    else:
        markers = {m: sum(token.startswith(m) for token in vocab) for m in ("Ġ", "▁")}
        marker = max(markers, key=markers.get)
        if markers[marker] == 0:
            raise LmforgeError("objective.whole_word_mask=true needs a tokenizer that marks word boundaries "
                               "(WordPiece '##', byte-level BPE 'Ġ' or SentencePiece '▁'); this one marks "
                               "none; set objective.whole_word_mask=false")
        for token, i in vocab.items():
            if i < size and not token.startswith(marker):
                table[i] = False
    special = [i for i in (*special_ids, *getattr(tokenizer, "all_special_ids", ())) if 0 <= i < size]
    table[special] = True
    return table


class MaskedLM(Objective):
    name, head, families = "mlm", "masked_lm", ("encoder",)

    def __init__(self, cfg, vocab, seed: int, tokenizer=None, world_size: int = 1):
        super().__init__(cfg, vocab, seed, tokenizer, world_size)
        if vocab.mask_id is None:
            raise LmforgeError(f"objective {self.name} needs a mask token, and the prepared data's tokenizer has "
                               "none; prepare the data again with this objective so its tokenizer gets one")
        named = (vocab.pad_id, vocab.mask_id, vocab.cls_id, vocab.sep_id, vocab.bos_id, vocab.eos_id, vocab.unk_id)
        self.special = np.unique(np.array([*vocab.special_ids, *vocab.sentinel_ids,
                                           *(i for i in named if i is not None)], dtype=np.int64))
        self.pad_id = vocab.pad_id if vocab.pad_id is not None else 0
        self.word_starts = None
        if cfg.whole_word_mask:
            if tokenizer is None:
                raise LmforgeError("objective.whole_word_mask=true needs the tokenizer to find word boundaries, "
                                   "and this corpus has none (bare token files); set "
                                   "objective.whole_word_mask=false or prepare the data from text")
            self.word_starts = word_start_table(tokenizer, vocab.size, self.special.tolist())

    @staticmethod
    def sample_spec(cfg) -> SampleSpec:
        return SampleSpec(kind="blocks", separator="sep", wrap=True, special_tokens=("mask", "cls", "sep"))

    def mask(self, sample: dict, train: bool) -> tuple[np.ndarray, np.ndarray]:
        return mask_tokens(sample["input_ids"], self.rng(sample, train), self.special, self.vocab.mask_id,
                           self.vocab.size, self.cfg.mask_prob, self.word_starts)

    def collate(self, samples: Sequence[dict], train: bool = True) -> dict[str, torch.Tensor]:
        """Mask each sample with its own generator (the same mask whatever batch it lands in), then
        right-pad: padding neither attends nor carries a label."""
        masked = [self.mask(s, train) for s in samples]
        input_ids, real = pad_stack([inputs for inputs, _ in masked], self.pad_id)
        labels, _ = pad_stack([labels for _, labels in masked], IGNORE_INDEX)
        batch = {"input_ids": input_ids, "attention_mask": real.long(), "labels": labels}
        if "token_type_ids" in samples[0]:
            batch["token_type_ids"], _ = pad_stack([s["token_type_ids"] for s in samples], 0)
        return batch

    def eval_sums(self, model, batch):
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        return token_loss_sums(model(**inputs).logits, batch["labels"])

    def metrics(self, sums):
        loss = sums["loss"] / max(sums["tokens"], 1.0)
        return {"loss": loss, "perplexity": math.exp(min(loss, 30.0)),
                "accuracy": sums["correct"] / max(sums["tokens"], 1.0)}
