"""Causal language modelling: predict each next token of packed blocks (or single documents)."""

from collections.abc import Sequence

import torch

from model.objectives.base import IGNORE_INDEX, Objective, next_token_loss_sums, pad_stack, perplexity_metrics


class CausalLM(Objective):
    name, head, families = "clm", "causal_lm", ("decoder",)

    def collate(self, samples: Sequence[dict], train: bool = True) -> dict[str, torch.Tensor]:
        """Right-pad to the longest sample in the batch; padding neither attends nor carries loss.

        Which positions are padding comes from the samples' lengths, never from token values: a tokenizer
        without a pad token (GPT-2's) or a token file whose vocabulary is all text has no id that is safe to
        treat as padding, and the end-of-text separator must keep its loss so the model learns to end a
        document. The fill value only has to be a valid embedding row: the pad id when there is one, else 0.
        """
        pad = self.vocab.pad_id if self.vocab.pad_id is not None else 0
        input_ids, real = pad_stack([s["input_ids"] for s in samples], pad)
        # HF causal LMs shift labels inside forward(), so input and label are the same block.
        if real.all():  # packed blocks: nothing to pad
            return {"input_ids": input_ids, "labels": input_ids.clone()}
        return {"input_ids": input_ids, "labels": input_ids.masked_fill(~real, IGNORE_INDEX),
                "attention_mask": real.long()}

    def eval_sums(self, model, batch):
        return next_token_loss_sums(model, batch)

    def metrics(self, sums):
        return perplexity_metrics(sums) | {"accuracy": sums["correct"] / max(sums["tokens"], 1.0)}
