"""Throughput and MFU bookkeeping for the training loop."""

import time

import torch
import torch.distributed as dist

from model.flops import step_flops


class StepMeter:
    """Times optimizer steps (not eval or checkpoint pauses) into tokens/s and MFU per logging window.

    Tokens are the real (non-pad) ones each micro-batch held, as its objective counts them; FLOPs follow the
    architecture's formula at the batch's padded lengths (attention runs over the padding too). Both are
    summed over ranks only when a window is read, so counting costs no synchronisation per step.
    """

    def __init__(self, model_cfg, vocab_rows: int, head: str, peak_flops_per_worker: float | None,
                 world_size: int, device="cpu"):
        self.model_cfg, self.vocab_rows, self.head = model_cfg, vocab_rows, head
        self.peak, self.world_size, self.device = peak_flops_per_worker, world_size, device
        self.busy_s, self.steps, self._started = 0.0, 0, 0.0
        self.tokens, self.flops = 0, 0.0

    def count(self, batch: dict[str, torch.Tensor], tokens: tuple[int, int]) -> None:
        """One micro-batch of this rank: (input tokens, decoder tokens) that are not padding."""
        enc_tokens, dec_tokens = tokens
        self.tokens += enc_tokens + dec_tokens
        dec_len = batch["labels"].shape[1] if dec_tokens else 0
        self.flops += step_flops(self.model_cfg, self.vocab_rows, self.head, enc_tokens,
                                 batch["input_ids"].shape[1], dec_tokens, dec_len)

    def start(self) -> None:
        self._started = time.perf_counter()

    def stop(self) -> None:
        self.busy_s += time.perf_counter() - self._started
        self.steps += 1

    def read(self) -> dict[str, float]:
        """step_time_s and tokens_per_second; mfu only when the hardware config names a peak to divide by.
        A collective: every rank calls it at the same step."""
        totals = torch.tensor([float(self.tokens), self.flops], dtype=torch.float64, device=self.device)
        if dist.is_initialized():
            dist.all_reduce(totals)
        tokens, flops = totals.tolist()
        busy = max(self.busy_s, 1e-9)
        window = {"step_time_s": self.busy_s / max(1, self.steps), "tokens_per_second": tokens / busy}
        self.busy_s, self.steps, self.tokens, self.flops = 0.0, 0, 0, 0.0
        if self.peak is None:
            return window
        return window | {"mfu": flops / busy / (self.peak * self.world_size)}
