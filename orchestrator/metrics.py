"""Throughput and MFU bookkeeping for the training loop."""

import time

from model.flops import mfu


class StepMeter:
    """Times optimizer steps (not eval or checkpoint pauses) into tokens/s and MFU per logging window."""

    def __init__(self, tokens_per_step: int, num_params: int, model_cfg, seq_len: int,
                 peak_flops_per_worker: float | None, world_size: int):
        self.tokens_per_step, self.num_params, self.model_cfg = tokens_per_step, num_params, model_cfg
        self.seq_len, self.peak, self.world_size = seq_len, peak_flops_per_worker, world_size
        self.busy_s, self.steps, self._started = 0.0, 0, 0.0

    def start(self) -> None:
        self._started = time.perf_counter()

    def stop(self) -> None:
        self.busy_s += time.perf_counter() - self._started
        self.steps += 1

    def read(self) -> dict[str, float]:
        """step_time_s and tokens_per_second; mfu only when the hardware config names a peak to divide by."""
        step_time = self.busy_s / max(1, self.steps)
        tokens_per_second = self.tokens_per_step / max(step_time, 1e-9)
        self.busy_s, self.steps = 0.0, 0
        window = {"step_time_s": step_time, "tokens_per_second": tokens_per_second}
        if self.peak is None:
            return window
        return window | {"mfu": mfu(tokens_per_second, self.num_params, self.model_cfg, self.seq_len, self.peak,
                                    self.world_size)}
