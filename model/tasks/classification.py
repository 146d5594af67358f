"""Sequence classification (sentiment, topic, NLI, paraphrase): one label, or with objective.multi_label
several, for a text or a pair of texts, predicted from BERT's [CLS] state."""

from collections import Counter
from collections.abc import Sequence

import numpy as np
import torch

from model.objectives.base import pad_stack
from model.tasks.base import BadRecord, Task, TaskBuilder, example_field

TOP_SHOWN = 5  # labels `show` lists under the prediction


def truncate_longest_first(first: list[int], second: list[int], budget: int) -> tuple[list[int], list[int]]:
    """Cut a pair to at most `budget` tokens by taking one token at a time from the end of the longer text
    (the first on ties), in closed form: what a fast HF tokenizer's truncation="longest_first" keeps."""
    budget = max(budget, 0)
    if len(first) + len(second) <= budget:
        return first, second
    # When both texts pass half the budget, the odd token stays with the longer one (with the second on ties).
    half = budget // 2 if len(second) < len(first) else budget - budget // 2
    keep_second = min(len(second), max(half, budget - len(first)))
    return first[:budget - keep_second], second[:keep_second]


def text_of(record: dict, role: str) -> str:
    text = record.get(role)
    if not isinstance(text, str):
        raise BadRecord(f"{role} is {type(text).__name__}, not a string" if text is not None else f"no {role}")
    if not text.strip():
        raise BadRecord(f"empty {role}")
    return text


def model_labels(labels: Sequence[str], model) -> list[str]:
    """The task's label names, or the model's own (id2label) when the task was made without prepared data."""
    if labels:
        return list(labels)
    id2label = model.config.id2label
    return [id2label[i] for i in range(len(id2label))]


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in batch.items() if k != "labels"}


class ClassificationBuilder(TaskBuilder):
    """[CLS] text [SEP] (text_pair [SEP]), token types 0 then 1, and the label id (multi-label: a 0/1 vector
    over the label vocabulary)."""

    def __init__(self, cfg, tokenizer, seq_len: int, labels: Sequence[str] = ()):
        super().__init__(cfg, tokenizer, seq_len, labels)
        self.multi_label = bool(cfg.multi_label)
        self.fields = {"input_ids": "ids", "token_type_ids": "int8",
                       "label": "int8" if self.multi_label else "int64", "example_id": "int64"}

    def label_names(self, record: dict) -> list[str]:
        try:
            return self.names(record)
        except BadRecord:  # the record fails, with its file and line, when its samples are built
            return []

    def names(self, record: dict) -> list[str]:
        """The record's label names as strings, or BadRecord when its label has the wrong shape."""
        label = record.get("label")
        if label is None:
            raise BadRecord("no label")
        if self.multi_label:
            # A single name is a one-label record; an empty list is a record none of the labels apply to.
            return [str(n) for n in label] if isinstance(label, list | tuple) else [str(label)]
        if isinstance(label, list | tuple | dict):
            raise BadRecord(f"label is a {type(label).__name__}; a record has one label unless "
                            "objective.multi_label=true")
        return [str(label)]

    def texts(self, record: dict) -> list[str]:
        return [record[role] for role in ("text", "text_pair") if isinstance(record.get(role), str)]

    def encode(self, text: str, text_pair: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids, token_type_ids) of a text or pair, cut to seq_len."""
        cls_id, sep_id = self.tokenizer.cls_token_id, self.tokenizer.sep_token_id
        first = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        second = self.tokenizer(text_pair, add_special_tokens=False)["input_ids"] if text_pair is not None else []
        if not first:
            raise BadRecord("the text has no tokens")
        if text_pair is None:
            first = first[:max(self.seq_len - 2, 0)]
            ids = [cls_id, *first, sep_id]
            return np.asarray(ids, dtype=np.int64), np.zeros(len(ids), dtype=np.int8)
        first, second = truncate_longest_first(first, second, self.seq_len - 3)
        ids = [cls_id, *first, sep_id, *second, sep_id]
        types = np.zeros(len(ids), dtype=np.int8)
        types[len(first) + 2:] = 1
        return np.asarray(ids, dtype=np.int64), types

    def label_field(self, record: dict) -> np.ndarray:
        ids = [self.label_id(name) for name in self.names(record)]
        if not self.multi_label:
            return np.asarray(ids, dtype=np.int64)
        vector = np.zeros(len(self.labels), dtype=np.int8)
        vector[ids] = 1
        return vector

    def samples(self, record: dict, example_id: int) -> list[dict[str, np.ndarray]]:
        text = text_of(record, "text")
        text_pair = text_of(record, "text_pair") if record.get("text_pair") is not None else None
        label = self.label_field(record)
        input_ids, token_type_ids = self.encode(text, text_pair)
        return [{"input_ids": input_ids, "token_type_ids": token_type_ids, "label": label,
                 "example_id": example_field(example_id)}]

    def reference(self, record: dict):
        """The gold label id; multi-label: the sorted ids of the labels that apply."""
        ids = [self.label_id(name) for name in self.names(record)]
        return sorted(set(ids)) if self.multi_label else ids[0]


class SequenceClassification(Task):
    """Cross-entropy over the labels (BertForSequenceClassification's single_label_classification), or
    per-label binary cross-entropy with objective.multi_label. Model selection watches accuracy, which is
    exact-match (subset) accuracy for multi-label records."""

    name, head, families = "seq_cls", "seq_cls", ("encoder",)
    roles = ("text", "text_pair", "label")
    required_roles = ("text", "label")
    labelled = True
    tokenizer_roles = ("cls", "sep")
    builder_class = ClassificationBuilder
    selection_metric, selection_mode = "val/accuracy", "max"

    def __init__(self, cfg, vocab, seed: int, tokenizer=None, world_size: int = 1):
        super().__init__(cfg, vocab, seed, tokenizer, world_size)
        self.pad_id = vocab.pad_id if vocab.pad_id is not None else 0
        self.multi_label = bool(cfg.multi_label)

    @staticmethod
    def head_config(cfg, labels: Sequence[str]) -> dict:
        return {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
                "label2id": {name: i for i, name in enumerate(labels)},
                "problem_type": "multi_label_classification" if cfg.multi_label else "single_label_classification"}

    def collate(self, samples: Sequence[dict], train: bool = True) -> dict[str, torch.Tensor]:
        input_ids, real = pad_stack([s["input_ids"] for s in samples], self.pad_id)
        token_type_ids, _ = pad_stack([s["token_type_ids"] for s in samples], 0)
        if self.multi_label:  # BCEWithLogitsLoss wants float targets
            labels = torch.from_numpy(np.stack([s["label"] for s in samples]).astype(np.float32))
        else:
            labels = torch.tensor([int(s["label"][0]) for s in samples], dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": real.long(), "token_type_ids": token_type_ids,
                "labels": labels}

    def eval_sums(self, model, batch):
        logits = model(**model_inputs(batch)).logits.float()
        labels = batch["labels"]
        if self.multi_label:
            # The model's loss is the mean over samples and labels: sum each sample's mean over labels.
            per_label = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels.float(), reduction="none")
            loss = per_label.mean(dim=1).sum()
        else:
            loss = torch.nn.functional.cross_entropy(logits, labels, reduction="sum")
        return {"loss": loss.double(),
                "samples": torch.full((), float(len(labels)), dtype=torch.float64, device=logits.device)}

    def metrics(self, sums):
        return {"loss": sums["loss"] / max(sums["samples"], 1.0)}

    def probabilities(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            logits = model(**model_inputs(batch)).logits.float()
        return torch.sigmoid(logits) if self.multi_label else torch.softmax(logits, dim=-1)

    def predict(self, model, batch: dict[str, torch.Tensor], samples: Sequence[dict]) -> list[dict]:
        probs = self.probabilities(model, batch).cpu()
        out = []
        for sample, p in zip(samples, probs):
            if self.multi_label:
                label = [int(i) for i in torch.nonzero(p > self.cfg.multi_label_threshold).flatten()]
            else:
                label = int(p.argmax())
            out.append({"example_id": int(sample["example_id"][0]), "label": label,
                        "probs": [round(float(x), 4) for x in p]})
        return out

    def score(self, predictions: list[dict], references: list) -> dict[str, float]:
        predicted = {}
        for prediction in predictions:  # a sample seen twice (padding a rank's last batch) counts once
            predicted.setdefault(int(prediction["example_id"]), prediction["label"])
        ids = sorted(predicted)
        return self.classification_metrics([references[i] for i in ids], [predicted[i] for i in ids])

    def classification_metrics(self, gold: list, predicted: list) -> dict[str, float]:
        """scikit-learn's accuracy, and precision, recall and F1 averaged over classes (macro) and by
        class frequency (weighted); multi-label: exact-match accuracy and micro/macro averages over the
        binarized label matrices."""
        from sklearn.metrics import accuracy_score, precision_recall_fscore_support

        if not gold:
            return {}
        metrics = {}
        if self.multi_label:
            from sklearn.preprocessing import MultiLabelBinarizer

            binarizer = MultiLabelBinarizer(classes=list(range(len(self.labels))))
            gold, predicted = binarizer.fit_transform(gold), binarizer.transform(predicted)
            averages = ("micro", "macro")
        else:
            averages = ("macro", "weighted")
        metrics["accuracy"] = float(accuracy_score(gold, predicted))
        for average in averages:
            p, r, f, _ = precision_recall_fscore_support(gold, predicted, average=average, zero_division=0)
            metrics |= {f"precision_{average}": float(p), f"recall_{average}": float(r), f"f1_{average}": float(f)}
        return metrics

    def baseline(self, references: list) -> dict[str, float]:
        """The majority class for every record; multi-label: each label that applies to most records."""
        if self.multi_label:
            counts = Counter(i for ids in references for i in ids)
            majority = sorted(i for i, n in counts.items() if n > len(references) / 2)
            return self.classification_metrics(references, [majority] * len(references))
        majority = Counter(references).most_common(1)[0][0] if references else 0
        return self.classification_metrics(references, [majority] * len(references))

    def infer(self, model, tokenizer, text: str, context: str | None = None) -> dict:
        """The label of `text` (with `context` as the second text of a pair) and every label's probability,
        most likely first; text past the model's positions is cut off as in training."""
        labels = model_labels(self.labels, model)
        builder = self.builder(self.cfg, tokenizer, model.config.max_position_embeddings, labels)
        input_ids, token_type_ids = builder.encode(text_of({"text": text}, "text"), context or None)
        device = next(model.parameters()).device
        batch = {"input_ids": torch.from_numpy(input_ids)[None].to(device),
                 "attention_mask": torch.ones(1, len(input_ids), dtype=torch.long, device=device),
                 "token_type_ids": torch.from_numpy(token_type_ids.astype(np.int64))[None].to(device)}
        probs = self.probabilities(model, batch)[0].cpu().tolist()
        ranked = sorted(zip(labels, probs), key=lambda pair: -pair[1])
        result = {"probabilities": dict(ranked)}
        if self.multi_label:
            result["labels"] = [name for name, p in ranked if p > self.cfg.multi_label_threshold]
        else:
            result["label"] = ranked[0][0]
        return result

    def show(self, result: dict) -> str:
        probs = result["probabilities"]
        if "labels" in result:
            head = ", ".join(f"{name} ({probs[name]:.3f})" for name in result["labels"]) or "no label"
        else:
            head = f"{result['label']} ({probs[result['label']]:.3f})"
        top = list(probs.items())[:TOP_SHOWN]
        width = max(len(name) for name, _ in top)
        return "\n".join([head, *(f"  {name:<{width}}  {p:.3f}" for name, p in top)])

