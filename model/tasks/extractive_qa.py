"""Extractive question answering (SQuAD): find the answer's span in the context. A long context is read in
overlapping windows, [CLS] question [SEP] window [SEP], and the best span over all of them is the answer."""

from collections.abc import Sequence

import numpy as np
import torch

from common.errors import LmforgeError
from model.objectives.base import pad_stack
from model.tasks.base import BadRecord, Task, TaskBuilder, example_field

MIN_SEQ_LEN = 8  # [CLS] question [SEP] context [SEP] with at least a few tokens of each
INFER_BATCH = 32  # windows scored at once by `infer` (a long context has many)


def gold_answers(record: dict, allow_unanswerable: bool) -> list[tuple[str, int]]:
    """(text, answer_start) of each answer, each checked to stand at its place in the context.

    Takes HF's layout {"text": [...], "answer_start": [...]} or the SQuAD JSON's [{"text", "answer_start"}].
    No answers means an unanswerable question, which only SQuAD 2.0 data (allow_unanswerable) may hold."""
    answers, context = record.get("answers"), record["context"]
    if answers is None:
        pairs = []
    elif isinstance(answers, dict):
        texts, starts = answers.get("text"), answers.get("answer_start")
        if texts is None or starts is None:
            raise BadRecord("answers must hold 'text' and 'answer_start' lists")
        texts = [texts] if isinstance(texts, str) else list(texts)
        starts = list(starts) if isinstance(starts, (list, tuple, np.ndarray)) else [starts]
        if len(texts) != len(starts):
            raise BadRecord(f"answers hold {len(texts)} text(s) but {len(starts)} answer_start(s)")
        pairs = list(zip(texts, starts))
    elif isinstance(answers, (list, tuple, np.ndarray)) and all(isinstance(a, dict) for a in answers):
        try:
            pairs = [(a["text"], a["answer_start"]) for a in answers]
        except KeyError as e:
            raise BadRecord(f"an answer has no {e.args[0]!r}") from None
    else:
        raise BadRecord("answers must be {'text': [...], 'answer_start': [...]} or a list of "
                        "{'text', 'answer_start'}")
    checked = []
    for text, start in pairs:
        try:
            start = int(start)
        except (TypeError, ValueError):
            raise BadRecord(f"answer_start {start!r} is not a character position") from None
        text = str(text)
        if not text:
            raise BadRecord("an answer's text is empty (an unanswerable question has empty answer lists)")
        if start < 0 or context[start:start + len(text)] != text:
            raise BadRecord(f"answer '{text}' is not at character {start} of its context")
        checked.append((text, start))
    if not checked and not allow_unanswerable:
        raise BadRecord("the question has no answer; SQuAD 2.0 data (unanswerable questions) needs "
                        "objective.allow_unanswerable=true")
    return checked


def text_of(record: dict, role: str) -> str:
    value = record[role]
    if not isinstance(value, str) or not value.strip():
        raise BadRecord(f"the {role} is empty" if isinstance(value, str) else f"the {role} is not text: {value!r}")
    return value


class QABuilder(TaskBuilder):
    fields = {"input_ids": "ids", "token_type_ids": "int8", "start_positions": "int32", "end_positions": "int32",
              "offset_start": "int32", "offset_end": "int32", "example_id": "int64"}

    def __init__(self, cfg, tokenizer, seq_len: int, labels: Sequence[str] = ()):
        super().__init__(cfg, tokenizer, seq_len, labels)
        if seq_len < MIN_SEQ_LEN:
            raise LmforgeError(f"objective=extractive_qa needs data.seq_len >= {MIN_SEQ_LEN} (it is {seq_len})")

    def texts(self, record: dict) -> list[str]:
        return [str(record["question"]), str(record["context"])]

    def windows(self, question: str, context: str) -> list[tuple[dict[str, np.ndarray], int, int]]:
        """[CLS] question [SEP] window [SEP] samples (without answer positions), each with the range of
        context tokens it holds. The question keeps at most half the sequence; windows overlap by
        objective.doc_stride tokens, or by half a window when a long question leaves less room than that
        (so a context never makes more than twice the windows the stride asks for)."""
        tok = self.tokenizer
        question_ids = tok(question, add_special_tokens=False)["input_ids"][:self.seq_len // 2]
        encoded = tok(context, add_special_tokens=False, return_offsets_mapping=True)
        context_ids = np.asarray(encoded["input_ids"], dtype=np.int64)
        offsets = np.asarray(encoded["offset_mapping"], dtype=np.int32).reshape(-1, 2)
        room = self.seq_len - len(question_ids) - 3
        overlap = min(self.cfg.doc_stride, room // 2)
        head = np.array([tok.cls_token_id, *question_ids, tok.sep_token_id], dtype=np.int64)
        no_offsets = np.full(len(head), -1, dtype=np.int32)
        out, begin = [], 0
        while True:
            end = min(begin + room, len(context_ids))
            window = {"input_ids": np.concatenate([head, context_ids[begin:end], [tok.sep_token_id]]),
                      "token_type_ids": np.concatenate([np.zeros(len(head), np.int8), np.ones(end - begin + 1, np.int8)]),
                      "offset_start": np.concatenate([no_offsets, offsets[begin:end, 0], [-1]]).astype(np.int32),
                      "offset_end": np.concatenate([no_offsets, offsets[begin:end, 1], [-1]]).astype(np.int32)}
            out.append((window, begin, end))
            if end >= len(context_ids):
                return out
            begin = end - overlap

    def samples(self, record: dict, example_id: int) -> list[dict[str, np.ndarray]]:
        """Every window of the record; its start/end positions are the first answer's tokens where the
        window holds the whole answer, and 0 ([CLS]) where it does not or there is no answer."""
        question, context = text_of(record, "question"), text_of(record, "context")
        answers = gold_answers(record, self.cfg.allow_unanswerable)
        samples = []
        for window, begin, end in self.windows(question, context):
            first_context = len(window["input_ids"]) - (end - begin) - 1
            start = stop = 0
            if answers:
                text, char_start = answers[0]
                tokens = np.arange(begin, end)
                starts, ends = window["offset_start"][first_context:-1], window["offset_end"][first_context:-1]
                # The answer's first token is the last one starting at or before it, its last token the
                # first ending at or after it; the window must hold both.
                at_or_before = tokens[starts <= char_start]
                reaching = tokens[ends >= char_start + len(text)]
                if begin < end and starts[0] <= char_start and len(reaching):
                    start = first_context + int(at_or_before[-1]) - begin
                    stop = first_context + int(reaching[0]) - begin
            samples.append(window | {"start_positions": np.array([start], np.int32),
                                     "end_positions": np.array([stop], np.int32),
                                     "example_id": example_field(example_id)})
        return samples

    def reference(self, record: dict) -> dict:
        answers = gold_answers(record, self.cfg.allow_unanswerable)
        reference = {"answers": [text for text, _ in answers], "context": text_of(record, "context")}
        if record.get("id") is not None:
            reference["id"] = str(record["id"])
        return reference


def answer_span(context: str, start: int, end: int) -> tuple[str, int, int]:
    """The context's text between two character offsets, without the surrounding whitespace some tokenizers'
    offsets include (byte-level BPE's leading space)."""
    text = context[start:end]
    stripped = text.lstrip()
    start += len(text) - len(stripped)
    text = stripped.rstrip()
    return text, start, start + len(text)


def choose_answer(windows: Sequence[dict], allow_unanswerable: bool) -> tuple[float, int, int] | None:
    """The best-scoring (score, start_char, end_char) over a record's windows, or None for no answer: when
    there is no candidate, or (SQuAD 2.0) the null score beats it. Like HF's run_qa, the null score is the
    lowest over the windows, as a window that does not hold the answer rightly scores [CLS] high."""
    candidates = [c for w in windows for c in w["candidates"]]
    best = max(candidates, key=lambda c: c[0]) if candidates else None
    if allow_unanswerable and windows:
        null = min(w["null_score"] for w in windows)
        if best is None or null > best[0]:
            return None
    return None if best is None else (float(best[0]), int(best[1]), int(best[2]))


def first_span(context: str, max_words: int) -> str:
    """The baseline's guess: the context's first sentence, cut to its first `max_words` words."""
    from data.segments import split_sentences

    sentences = split_sentences(context)
    return " ".join((sentences[0] if sentences else context).split()[:max_words])


class ExtractiveQA(Task):
    name, head, families = "extractive_qa", "qa", ("encoder",)
    roles = ("id", "question", "context", "answers")
    required_roles = ("question", "context")
    labelled = False
    tokenizer_roles = ("cls", "sep")
    builder_class = QABuilder
    selection_metric, selection_mode = "val/f1", "max"

    def __init__(self, cfg, vocab, seed: int, tokenizer=None, world_size: int = 1):
        super().__init__(cfg, vocab, seed, tokenizer, world_size)
        self.pad_id = vocab.pad_id if vocab.pad_id is not None else 0

    def collate(self, samples: Sequence[dict], train: bool = True) -> dict[str, torch.Tensor]:
        """Right-padded windows; the answer positions ride along for the loss when the samples have them
        (`infer` builds windows without)."""
        input_ids, real = pad_stack([s["input_ids"] for s in samples], self.pad_id)
        token_types, _ = pad_stack([s["token_type_ids"] for s in samples], 0)
        batch = {"input_ids": input_ids, "attention_mask": real.long(), "token_type_ids": token_types}
        if "start_positions" in samples[0]:
            for key in ("start_positions", "end_positions"):
                batch[key] = torch.tensor([int(s[key][0]) for s in samples], dtype=torch.long)
        return batch

    def eval_sums(self, model, batch):
        windows = batch["input_ids"].shape[0]
        loss = model(**batch).loss  # the mean over the batch of (start CE + end CE) / 2
        return {"loss": loss.double() * windows, "windows": torch.tensor(float(windows), dtype=torch.float64)}

    def metrics(self, sums):
        return {"loss": sums["loss"] / max(sums["windows"], 1.0)}

    def predict(self, model, batch: dict[str, torch.Tensor], samples: Sequence[dict]) -> list[dict]:
        """Per window: its best `n_best` spans as [score, start_char, end_char] (score: start logit + end
        logit; spans inside the context, start <= end, at most max_answer_length tokens), best first, and
        the [CLS] "no answer" score."""
        inputs = {k: v for k, v in batch.items() if k not in ("start_positions", "end_positions")}
        with torch.no_grad():
            out = model(**inputs)
        start_logits, end_logits = out.start_logits.float().cpu(), out.end_logits.float().cpu()
        return [{"example_id": int(s["example_id"][0]),
                 "candidates": self.candidates(starts, ends, s["offset_start"], s["offset_end"]),
                 "null_score": float(starts[0] + ends[0])}
                for s, starts, ends in zip(samples, start_logits, end_logits)]

    def candidates(self, start_logits: torch.Tensor, end_logits: torch.Tensor, offset_start: np.ndarray,
                   offset_end: np.ndarray) -> list[list]:
        context = torch.from_numpy(np.flatnonzero(np.asarray(offset_start) >= 0))
        if len(context) == 0:
            return []
        k = min(self.cfg.n_best, len(context))
        starts = context[start_logits[context].topk(k).indices]
        ends = context[end_logits[context].topk(k).indices]
        scores = start_logits[starts][:, None] + end_logits[ends][None, :]
        length = ends[None, :] - starts[:, None] + 1
        scores[(length < 1) | (length > self.cfg.max_answer_length)] = -torch.inf
        flat = scores.flatten()
        keep = flat.topk(min(self.cfg.n_best, len(flat))).indices
        keep = keep[torch.isfinite(flat[keep])]
        return [[float(flat[i]), int(offset_start[starts[i // k]]), int(offset_end[ends[i % k]])] for i in keep.tolist()]

    def predicted_answers(self, predictions: list[dict], references) -> dict:
        """Example id -> the predicted answer text, from its windows' predictions."""
        by_example: dict[int, list[dict]] = {}
        for prediction in predictions:
            by_example.setdefault(int(prediction["example_id"]), []).append(prediction)
        texts = {}
        for example_id, reference in self._items(references):
            chosen = choose_answer(by_example.get(example_id, []), self.cfg.allow_unanswerable)
            texts[example_id] = "" if chosen is None else answer_span(reference["context"], *chosen[1:])[0]
        return texts

    def score(self, predictions: list[dict], references) -> dict[str, float]:
        from model.tasks.squad_metric import squad_scores

        golds = {example_id: reference["answers"] for example_id, reference in self._items(references)}
        return squad_scores(self.predicted_answers(predictions, references), golds)

    def baseline(self, references) -> dict[str, float]:
        """The better (by F1) of two guesses that read no question: the empty answer (right for every
        unanswerable question) and the context's first sentence, cut to max_answer_length words."""
        from model.tasks.squad_metric import squad_scores

        items = list(self._items(references))
        golds = {example_id: reference["answers"] for example_id, reference in items}
        empty = squad_scores({example_id: "" for example_id, _ in items}, golds)
        first = squad_scores({example_id: first_span(reference["context"], self.cfg.max_answer_length)
                              for example_id, reference in items}, golds)
        return max(empty, first, key=lambda s: (s["f1"], s["exact_match"]))

    @staticmethod
    def _items(references):
        return references.items() if isinstance(references, dict) else enumerate(references)

    def infer(self, model, tokenizer, text: str, context: str | None = None) -> dict:
        """The answer to the question `text` in `context`, with its character span and score (start +
        end logit); an empty answer (SQuAD 2.0 models) when the context does not answer it."""
        if not context or not context.strip():
            raise LmforgeError("extractive_qa needs --context: the text to find the answer in")
        if not text.strip():
            raise LmforgeError("extractive_qa needs a question")
        builder = self.builder(self.cfg, tokenizer, int(model.config.max_position_embeddings))
        windows = [dict(window, example_id=example_field(0)) for window, _, _ in builder.windows(text, context)]
        device = next(model.parameters()).device
        model.eval()
        predictions = []
        for first in range(0, len(windows), INFER_BATCH):
            chunk = windows[first:first + INFER_BATCH]
            batch = {k: v.to(device) for k, v in self.collate(chunk, train=False).items()}
            predictions.extend(self.predict(model, batch, chunk))
        chosen = choose_answer(predictions, self.cfg.allow_unanswerable)
        if chosen is None:
            null = min(p["null_score"] for p in predictions)
            return {"answer": "", "start": None, "end": None, "score": round(null, 4)}
        answer, start, end = answer_span(context, chosen[1], chosen[2])
        return {"answer": answer, "start": start, "end": end, "score": round(chosen[0], 4)}

    def show(self, result: dict) -> str:
        if result["start"] is None:
            return f"answer: (none: the context does not answer the question)\nscore: {result['score']:.2f}"
        return (f"answer: {result['answer']}\n"
                f"span: characters {result['start']}-{result['end']} of the context\n"
                f"score: {result['score']:.2f}")
