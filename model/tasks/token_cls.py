"""Token classification (named entities, chunks): a BIO tag for every word of a pre-split sentence, predicted
from the state of the word's first subword token, and scored by entity with seqeval."""

import re
from collections.abc import Sequence

import numpy as np
import torch

from model.objectives.base import IGNORE_INDEX, pad_stack, token_loss_sums
from model.tasks.base import BadRecord, Task, TaskBuilder, example_field
from model.tasks.classification import model_labels

OUTSIDE = "O"
WORD = re.compile(r"\w+|[^\w\s]")  # words and single punctuation marks, for tokenizers without a pre-tokenizer


def words_and_tags(record: dict, tagged: bool = True) -> tuple[list[str], list[str]]:
    """The record's words and tags, checked: lists of strings, one tag per word."""
    checked = []
    for role in ("tokens", "tags") if tagged else ("tokens",):
        value = record.get(role)
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
            raise BadRecord(f"{role} is {'missing' if value is None else type(value).__name__}, "
                            "not a list of strings")
        checked.append(list(value))
    words = checked[0]
    if not words:
        raise BadRecord("no tokens")
    if tagged and len(checked[1]) != len(words):
        raise BadRecord(f"{len(checked[1])} tags for {len(words)} tokens")
    return words, checked[1] if tagged else []


def split_words(tokenizer, text: str) -> list[tuple[str, int, int]]:
    """(word, start, end) character spans of `text` as the tokenizer's pre-tokenizer splits it (BERT's:
    at whitespace and punctuation, as CoNLL-style corpora are split), so words match the training records."""
    pre_tokenizer = getattr(getattr(tokenizer, "backend_tokenizer", None), "pre_tokenizer", None)
    if pre_tokenizer is not None:
        spans = [offsets for _, offsets in pre_tokenizer.pre_tokenize_str(text)]
    else:
        spans = [m.span() for m in WORD.finditer(text)]
    words = []
    for start, end in spans:
        piece = text[start:end]
        word = piece.strip()  # byte-level and Metaspace pre-tokenizers keep the space before a word
        if word:
            start += len(piece) - len(piece.lstrip())
            words.append((word, start, start + len(word)))
    return words


class TokenBuilder(TaskBuilder):
    """[CLS] subwords [SEP] cut to seq_len. Only a word's first subword carries its tag (later subwords and
    the special tokens carry IGNORE_INDEX), and `word_index` says which word each such token starts.

    Words cut off by seq_len do not train. Their gold tags stay in the reference, so evaluation counts them
    as predicted "O": a truncated sentence costs recall instead of silently shrinking the test set."""

    fields = {"input_ids": "ids", "labels": "int16", "word_index": "int32", "example_id": "int64"}

    def label_names(self, record: dict) -> list[str]:
        try:
            return words_and_tags(record)[1]
        except BadRecord:  # the record fails, with its file and line, when its samples are built
            return []

    def texts(self, record: dict) -> list[str]:
        tokens = record.get("tokens")
        return [" ".join(tokens)] if isinstance(tokens, list | tuple) and tokens else []

    def encode(self, words: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids, word_index) of pre-split words: word_index is the word a token starts, -1 elsewhere."""
        encoding = self.tokenizer(words, is_split_into_words=True, add_special_tokens=False)
        budget = max(self.seq_len - 2, 0)
        ids, word_ids = encoding["input_ids"][:budget], encoding.word_ids()[:budget]
        word_index = np.full(len(ids) + 2, -1, dtype=np.int32)
        previous = None
        for position, word in enumerate(word_ids):
            if word is not None and word != previous:
                word_index[position + 1] = word
            previous = word
        input_ids = np.asarray([self.tokenizer.cls_token_id, *ids, self.tokenizer.sep_token_id], dtype=np.int64)
        return input_ids, word_index

    def samples(self, record: dict, example_id: int) -> list[dict[str, np.ndarray]]:
        words, tags = words_and_tags(record)
        tag_ids = np.asarray([self.label_id(tag) for tag in tags], dtype=np.int16)
        input_ids, word_index = self.encode(words)
        labels = np.full(len(input_ids), IGNORE_INDEX, dtype=np.int16)
        starts = word_index >= 0
        labels[starts] = tag_ids[word_index[starts]]
        return [{"input_ids": input_ids, "labels": labels, "word_index": word_index,
                 "example_id": example_field(example_id)}]

    def reference(self, record: dict):
        """Every word's gold tag, including words cut off by seq_len."""
        _, tags = words_and_tags(record)
        for tag in tags:
            self.label_id(tag)
        return tags


class TokenClassification(Task):
    """Cross-entropy over the tags of first subwords (BertForTokenClassification); model selection watches
    seqeval's entity F1."""

    name, head, families = "token_cls", "token_cls", ("encoder",)
    roles = required_roles = ("tokens", "tags")
    labelled = True
    tokenizer_roles = ("cls", "sep")
    builder_class = TokenBuilder
    selection_metric, selection_mode = "val/f1", "max"

    def __init__(self, cfg, vocab, seed: int, tokenizer=None, world_size: int = 1):
        super().__init__(cfg, vocab, seed, tokenizer, world_size)
        self.pad_id = vocab.pad_id if vocab.pad_id is not None else 0

    @staticmethod
    def head_config(cfg, labels: Sequence[str]) -> dict:
        return {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
                "label2id": {name: i for i, name in enumerate(labels)}}

    def collate(self, samples: Sequence[dict], train: bool = True) -> dict[str, torch.Tensor]:
        input_ids, real = pad_stack([s["input_ids"] for s in samples], self.pad_id)
        labels, _ = pad_stack([s["labels"] for s in samples], IGNORE_INDEX)
        return {"input_ids": input_ids, "attention_mask": real.long(), "labels": labels}

    def eval_sums(self, model, batch):
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        return token_loss_sums(model(**inputs).logits, batch["labels"])

    def metrics(self, sums):
        return {"loss": sums["loss"] / max(sums["tokens"], 1.0)}

    def word_tags(self, logits: torch.Tensor, word_index: np.ndarray, labels: Sequence[str]) -> list[str]:
        """One tag per word up to the last word the sample holds, from its first subword's logits; a word
        that has no token (nothing the tokenizer keeps) is "O"."""
        word_index = np.asarray(word_index)
        starts = np.flatnonzero(word_index >= 0)
        tags = [OUTSIDE] * (int(word_index.max()) + 1 if len(starts) else 0)
        best = logits[torch.from_numpy(starts).to(logits.device)].argmax(-1).tolist()
        for position, tag_id in zip(starts, best):
            tags[word_index[position]] = labels[tag_id]
        return tags

    def predict(self, model, batch: dict[str, torch.Tensor], samples: Sequence[dict]) -> list[dict]:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        with torch.no_grad():
            logits = model(**inputs).logits
        return [{"example_id": int(s["example_id"][0]), "tags": self.word_tags(row, s["word_index"], self.labels)}
                for s, row in zip(samples, logits)]

    def score(self, predictions: list[dict], references: list) -> dict[str, float]:
        predicted = {}
        for prediction in predictions:  # a sample seen twice (padding a rank's last batch) counts once
            predicted.setdefault(int(prediction["example_id"]), prediction["tags"])
        gold, guessed = [], []
        for example_id in sorted(predicted):
            truth, tags = references[example_id], list(predicted[example_id])
            gold.append(truth)
            # Words past seq_len were never predicted: they count as "O".
            guessed.append((tags + [OUTSIDE] * len(truth))[:len(truth)])
        return entity_metrics(gold, guessed)

    def baseline(self, references: list) -> dict[str, float]:
        """Every word "O": no entities (F1 0); the accuracy is the share of words outside any entity."""
        return entity_metrics(references, [[OUTSIDE] * len(tags) for tags in references])

    def infer(self, model, tokenizer, text: str, context: str | None = None) -> dict:
        """The entities in `text`, with their character spans: words are split as the tokenizer's
        pre-tokenizer splits them, tagged, and B-/I- runs grouped by seqeval. Words past the model's
        positions are "O", as truncated words are in evaluation."""
        from seqeval.metrics.sequence_labeling import get_entities

        words = split_words(tokenizer, text)
        if not words:
            return {"entities": []}
        labels = model_labels(self.labels, model)
        builder = self.builder(self.cfg, tokenizer, model.config.max_position_embeddings, labels)
        input_ids, word_index = builder.encode([word for word, _, _ in words])
        device = next(model.parameters()).device
        with torch.no_grad():
            logits = model(input_ids=torch.from_numpy(input_ids)[None].to(device)).logits[0]
        tags = self.word_tags(logits, word_index, labels)
        tags += [OUTSIDE] * (len(words) - len(tags))
        entities = []
        for kind, first, last in get_entities(tags):
            start, end = words[first][1], words[last][2]
            entities.append({"type": kind, "text": text[start:end], "start": start, "end": end})
        return {"entities": entities}

    def show(self, result: dict) -> str:
        if not result["entities"]:
            return "no entities"
        width = max(len(e["type"]) for e in result["entities"])
        return "\n".join(f"{e['type']:<{width}}  {e['text']}  [{e['start']}:{e['end']}]" for e in result["entities"])


def entity_metrics(gold: list[list[str]], predicted: list[list[str]]) -> dict[str, float]:
    """seqeval's entity-level precision, recall and F1 (micro over entities, conlleval's lenient matching
    of the default mode) and its word-level accuracy."""
    from seqeval.metrics import accuracy_score, f1_score, precision_score, recall_score

    if not gold:
        return {}
    return {"precision": float(precision_score(gold, predicted, zero_division=0)),
            "recall": float(recall_score(gold, predicted, zero_division=0)),
            "f1": float(f1_score(gold, predicted, zero_division=0)),
            "accuracy": float(accuracy_score(gold, predicted))}
