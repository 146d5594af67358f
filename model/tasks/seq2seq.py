"""Sequence-to-sequence fine-tuning of T5 (summaries, translations): the encoder reads the source, the decoder
learns the target; evaluation generates and scores with BLEU and ROUGE."""

from collections.abc import Sequence

import numpy as np
import torch

from common.errors import BadRecord
from model.objectives.base import (
    encoder_decoder_batch,
    encoder_decoder_tokens,
    perplexity_metrics,
    token_loss_sums,
)
from model.tasks.base import Task, TaskBuilder, example_field


def record_text(record: dict, role: str) -> str:
    """The record's text for `role`, or BadRecord when there is none: an empty target teaches the model to
    stop at once, and an empty source gives it nothing to condition on."""
    value = record.get(role)
    text = "" if value is None else value if isinstance(value, str) else str(value)
    if not text.strip():
        raise BadRecord(f"{role} is empty")
    return text


class Seq2SeqBuilder(TaskBuilder):
    fields = {"input_ids": "ids", "labels": "ids", "example_id": "int64"}

    def texts(self, record: dict) -> list[str]:
        return [str(record[role]) for role in ("source", "target") if record.get(role)]

    def encode(self, text: str, limit: int) -> np.ndarray:
        """`text`'s ids cut to limit - 1, then eos. Added here rather than by the tokenizer's post-processor:
        a tokenizer lmforge trains has none, and a published one's would add it a second time."""
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"][: limit - 1]
        return np.asarray([*ids, self.tokenizer.eos_token_id], dtype=np.int64)

    def samples(self, record: dict, example_id: int) -> list[dict[str, np.ndarray]]:
        source, target = record_text(record, "source"), record_text(record, "target")
        return [{"input_ids": self.encode(self.cfg.source_prefix + source, self.seq_len),
                 "labels": self.encode(target, self.cfg.max_target_len), "example_id": example_field(example_id)}]

    def reference(self, record: dict) -> dict:
        # The source rides along for the copy-the-source baseline.
        return {"target": record_text(record, "target"), "source": record_text(record, "source")}


def text_scores(predictions: Sequence[str], targets: Sequence[str]) -> dict[str, float]:
    """Corpus BLEU (sacrebleu, its default 13a tokenization) and the mean over examples of the ROUGE-1, ROUGE-2
    and ROUGE-L F-measures (rouge_score, Porter stemming; ROUGE-L over the whole text, not per sentence);
    all on a 0-100 scale, as BLEU is usually reported, ROUGE included."""
    import sacrebleu
    from rouge_score import rouge_scorer

    if not predictions:
        return {}
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    rouge = [scorer.score(target, prediction) for prediction, target in zip(predictions, targets)]
    scores = {"bleu": sacrebleu.corpus_bleu(list(predictions), [list(targets)]).score}
    for key, name in (("rouge1", "rouge1"), ("rouge2", "rouge2"), ("rougeL", "rouge_l")):
        scores[name] = 100.0 * float(np.mean([r[key].fmeasure for r in rouge]))
    return scores


class Seq2Seq(Task):
    name, head, families = "seq2seq", "seq2seq_lm", ("encoder_decoder",)
    roles = required_roles = ("source", "target")
    tokenizer_roles = ("eos",)
    builder_class = Seq2SeqBuilder
    selection_metric, selection_mode = "val/rouge_l", "max"

    def __init__(self, cfg, vocab, seed: int, tokenizer=None, world_size: int = 1):
        super().__init__(cfg, vocab, seed, tokenizer, world_size)
        self.pad_id = vocab.pad_id if vocab.pad_id is not None else 0

    def collate(self, samples: Sequence[dict], train: bool = True) -> dict[str, torch.Tensor]:
        return encoder_decoder_batch([s["input_ids"] for s in samples], [s["labels"] for s in samples], self.pad_id)

    def tokens(self, batch):
        return encoder_decoder_tokens(batch)

    def eval_sums(self, model, batch):
        return token_loss_sums(model(**batch).logits, batch["labels"])

    def metrics(self, sums):
        return perplexity_metrics(sums)

    def generate(self, model, tokenizer, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[str]:
        # A DeepSpeed engine holds the HF model as .module. Under ZeRO-3 every rank gathers each layer's
        # weights together, so a rank whose batch finished early must keep stepping until all have
        # (synced_gpus), or the others wait on it forever.
        out = getattr(model, "module", model).generate(
            input_ids=input_ids, attention_mask=attention_mask, num_beams=self.cfg.num_beams,
            max_new_tokens=self.cfg.max_new_tokens, synced_gpus=self.world_size > 1, use_cache=True)
        return tokenizer.batch_decode(out, skip_special_tokens=True)

    def predict(self, model, batch, samples):
        texts = self.generate(model, self.tokenizer, batch["input_ids"], batch["attention_mask"])
        return [{"example_id": int(np.asarray(s["example_id"]).reshape(-1)[0]), "text": text}
                for s, text in zip(samples, texts)]

    def score(self, predictions, references):
        return text_scores([p["text"] for p in predictions],
                           [references[p["example_id"]]["target"] for p in predictions])

    def baseline(self, references):
        """Copying the source: what a model that learned nothing but to repeat its input would score."""
        return text_scores([r["source"] for r in references], [r["target"] for r in references])

    def infer(self, model, tokenizer, text, context=None):
        encoded = tokenizer(self.cfg.source_prefix + text, add_special_tokens=False)["input_ids"]
        device = next(model.parameters()).device
        input_ids = torch.tensor([[*encoded, tokenizer.eos_token_id]], device=device)
        with torch.no_grad():
            output, = self.generate(model, tokenizer, input_ids, torch.ones_like(input_ids))
        return {"output": output}

    def show(self, result):
        return result["output"]
