"""Unsupervised SimCSE (Gao et al. 2021): a sentence encoder learns from two dropout views of each sentence.

Each sentence is encoded twice in one forward pass; dropout makes the two embeddings differ, and an InfoNCE
loss pulls a sentence's views together while pushing it away from every other sentence in the batch (and,
with `gather_negatives`, in every rank's batch). The dropout masks are drawn from a generator seeded by the
batch's samples, so a step computes the same loss on any number of workers and after a resume.
"""

import math
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F

from data.samples import SampleSpec
from model.objectives.base import Objective, pad_stack
from model.objectives.config import POOLINGS


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """One vector per sequence from token states (batch, length, width): the mean over real tokens, or
    the first real token ([CLS] for BERT). Both match sentence-transformers' Pooling module, so an
    exported model embeds exactly as it was trained."""
    if pooling == "cls":
        # argmax finds the first 1: position 0 with right padding, and still right if padding is on the left.
        first = attention_mask.long().argmax(dim=1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), first]
    if pooling == "mean":
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
    raise ValueError(f"pooling={pooling!r}; expected one of {', '.join(POOLINGS)}")


@contextmanager
def seeded_dropout(model, device: torch.device, seed: int) -> Iterator[None]:
    """Run with the model in train mode (dropout on) and the RNG of `device` (and the CPU's) seeded by
    `seed`; the model's mode and both RNG states are restored afterwards, so the training loop's own random
    stream is not disturbed by how many views were drawn."""
    accelerated = device.type not in ("cpu", "meta")
    was_training = model.training
    with torch.random.fork_rng(devices=[device] if accelerated else [],
                               device_type=device.type if accelerated else None):
        torch.random.default_generator.manual_seed(seed)
        if accelerated:
            # Seed only the batch's device: torch.manual_seed would also reseed every other visible GPU,
            # whose state fork_rng does not restore.
            device_module = torch.get_device_module(device.type)
            with device_module.device(device):
                device_module.manual_seed(seed)
        model.train()
        try:
            yield
        finally:
            model.train(was_training)


class Contrastive(Objective):
    name, head, families = "contrastive", "encoder", ("encoder", "encoder_decoder")

    @staticmethod
    def sample_spec(cfg) -> SampleSpec:
        return SampleSpec(kind="segments", segments="sentences", wrap=True, special_tokens=("cls", "sep"))

    def collate(self, samples: Sequence[dict], train: bool = True) -> dict[str, torch.Tensor]:
        """Right-pad the sentences; `dropout_seed` mixes one draw from each sample's own stream, so the two
        views' dropout masks are a function of which samples are in the batch (and their order), never of a
        rank's torch RNG state, which a resume on another number of workers would not reproduce."""
        pad = self.vocab.pad_id if self.vocab.pad_id is not None else 0
        input_ids, real = pad_stack([np.asarray(s["input_ids"]) for s in samples], pad)
        draws = [int(self.rng(s, train).integers(2**62)) for s in samples]
        seed = int(np.random.SeedSequence(draws).generate_state(1, np.uint64)[0] >> np.uint64(2))
        return {"input_ids": input_ids, "attention_mask": real.long(),
                "dropout_seed": torch.tensor(seed, dtype=torch.int64)}

    def tokens(self, batch: dict[str, torch.Tensor]) -> tuple[int, int]:
        return 2 * int(batch["attention_mask"].sum()), 0  # every sentence goes through the encoder twice

    def views(self, model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The two L2-normalised dropout views (batch, width) of each sentence, from one forward pass over
        the batch stacked on itself: every row draws its own dropout mask, so a sentence's two copies differ
        only by dropout. Under torch.no_grad() when the caller wants no graph."""
        input_ids, mask = batch["input_ids"], batch["attention_mask"]
        both_mask = mask.repeat(2, 1)
        with seeded_dropout(model, input_ids.device, int(batch["dropout_seed"])):
            hidden = model(input_ids=input_ids.repeat(2, 1), attention_mask=both_mask).last_hidden_state
        # Pool and compare in float32: bf16 cosine similarities divided by a 0.05 temperature are too coarse.
        embeddings = F.normalize(pool(hidden.float(), both_mask, self.cfg.pooling), dim=-1)
        return embeddings[:input_ids.shape[0]], embeddings[input_ids.shape[0]:]

    def gathers(self) -> bool:
        """Whether the loss takes negatives from every rank: the config's choice (default: when training on
        more than one worker), and only when there is a process group to gather over."""
        wanted = self.cfg.gather_negatives if self.cfg.gather_negatives is not None else self.world_size > 1
        if not wanted or not torch.distributed.is_available() or not torch.distributed.is_initialized():
            return False
        return torch.distributed.get_world_size() > 1

    def loss(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """InfoNCE over the view-1 x view-2 similarities: row i's positive is sentence i's second view and
        every other sentence's second view is a negative. Gathered negatives keep their autograd graph
        (torch.distributed.nn's all_gather sums the other ranks' gradients back into this rank's
        embeddings), and every rank's micro-batch has the same size, so this rank's rows start at rank * B."""
        queries, keys = self.views(model, batch)
        offset = 0
        if self.gathers():
            from torch.distributed.nn.functional import all_gather

            offset = torch.distributed.get_rank() * queries.shape[0]
            with warnings.catch_warnings():
                # torch 2.13 points to a replacement in the private _functional_collectives module; this
                # public function keeps working, and its notice would repeat in every worker's log.
                warnings.filterwarnings("ignore", "torch.distributed.nn.functional.all_gather is deprecated",
                                        FutureWarning)
                keys = torch.cat(all_gather(keys))
        logits = queries @ keys.T / self.cfg.temperature
        labels = torch.arange(queries.shape[0], device=logits.device) + offset
        return F.cross_entropy(logits, labels)

    def eval_sums(self, model, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Validation draws the two views with dropout too (seeded, so every evaluation sees the same masks):
        without it the views would be identical and the loss would only measure how spread out the
        sentences are. Only the local batch's sentences are negatives, so the numbers do not depend on the
        number of workers. Alignment and uniformity follow Wang & Isola (2020): the squared distance between
        a sentence's views, and the Gaussian potential exp(-2 |x - y|^2) over pairs of different sentences
        (view 1)."""
        with torch.no_grad():
            queries, keys = self.views(model, batch)
            similarity = queries @ keys.T
            labels = torch.arange(queries.shape[0], device=similarity.device)
            loss = F.cross_entropy(similarity / self.cfg.temperature, labels, reduction="sum")
            correct = (similarity.argmax(dim=-1) == labels).sum()
            alignment = (queries - keys).pow(2).sum(dim=-1).sum()
            pair_distances = torch.pdist(queries).pow(2)  # each unordered pair of distinct sentences once
            kernel = torch.exp(-2.0 * pair_distances).sum()
        return {"loss": loss.double(), "correct": correct.double(),
                "sentences": torch.tensor(float(queries.shape[0]), dtype=torch.float64, device=loss.device),
                "alignment": alignment.double(), "uniformity_kernel": kernel.double(),
                "pairs": torch.tensor(float(pair_distances.numel()), dtype=torch.float64, device=loss.device)}

    def metrics(self, sums: dict[str, float]) -> dict[str, float]:
        sentences = max(sums["sentences"], 1.0)
        # Uniformity is undefined without a pair of sentences (every validation batch of size 1): NaN says so.
        uniformity = math.log(sums["uniformity_kernel"] / sums["pairs"]) \
            if sums["pairs"] > 0 and sums["uniformity_kernel"] > 0 else math.nan
        return {"loss": sums["loss"] / sentences, "retrieval_accuracy": sums["correct"] / sentences,
                "alignment": sums["alignment"] / sentences, "uniformity": uniformity}
