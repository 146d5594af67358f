"""BERT's original pre-training: masked language modelling plus next-sentence prediction on sentence pairs."""

import math
from collections.abc import Sequence

import torch

from data.samples import SampleSpec
from model.objectives.base import token_loss_sums
from model.objectives.mlm import MaskedLM


class MaskedLMWithNSP(MaskedLM):
    """Samples are [CLS] A [SEP] B [SEP] pairs built by data.segments.PairBuilder; next_sentence_label is
    0 when B continues A and 1 when B comes from another document (BertForPreTraining's convention)."""

    name, head = "mlm_nsp", "pretraining"

    @staticmethod
    def sample_spec(cfg) -> SampleSpec:
        # The pair shares are decided when the data is prepared, so they are part of the prepared data's key.
        return SampleSpec(kind="pairs", segments="sentences", special_tokens=("mask", "cls", "sep"),
                          random_next_prob=cfg.random_next_prob, short_seq_prob=cfg.short_seq_prob)

    def collate(self, samples: Sequence[dict], train: bool = True) -> dict[str, torch.Tensor]:
        batch = super().collate(samples, train)
        batch["next_sentence_label"] = torch.tensor([int(s["next_sentence_label"][0]) for s in samples])
        return batch

    def eval_sums(self, model, batch):
        # Without labels BertForPreTraining returns both heads' logits; the sums are built from those so
        # that they add up over batches and ranks (the model's own loss is a per-batch mean).
        nsp_labels = batch["next_sentence_label"]
        inputs = {k: v for k, v in batch.items() if k not in ("labels", "next_sentence_label")}
        out = model(**inputs)
        mlm = token_loss_sums(out.prediction_logits, batch["labels"])
        nsp_logits = out.seq_relationship_logits.float()
        nsp_loss = torch.nn.functional.cross_entropy(nsp_logits, nsp_labels, reduction="sum")
        return {"mlm_loss": mlm["loss"], "mlm_correct": mlm["correct"], "mlm_tokens": mlm["tokens"],
                "nsp_loss": nsp_loss.double(), "nsp_correct": (nsp_logits.argmax(-1) == nsp_labels).sum().double(),
                "nsp_pairs": torch.full((), float(len(nsp_labels)), dtype=torch.float64, device=nsp_logits.device)}

    def metrics(self, sums):
        mlm_loss = sums["mlm_loss"] / max(sums["mlm_tokens"], 1.0)
        nsp_loss = sums["nsp_loss"] / max(sums["nsp_pairs"], 1.0)
        # BertForPreTraining optimises the sum of the two means, so that is the loss reported.
        return {"loss": mlm_loss + nsp_loss, "mlm_loss": mlm_loss, "nsp_loss": nsp_loss,
                "perplexity": math.exp(min(mlm_loss, 30.0)),
                "mlm_accuracy": sums["mlm_correct"] / max(sums["mlm_tokens"], 1.0),
                "nsp_accuracy": sums["nsp_correct"] / max(sums["nsp_pairs"], 1.0)}
