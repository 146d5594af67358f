"""Training FLOPs per token and model FLOPs utilisation (MFU), as in the PaLM paper's appendix B.

Per token, a forward+backward pass over the dense weights costs 6N FLOPs (2 forward, 4 backward), where N
counts the parameters that take part in matmuls: everything except position embeddings, which are a table
lookup. Attention's score and value products add 12 * n_layer * n_embd * seq_len: 2 matmuls (QK^T and AV)
of 2 * seq_len * n_embd FLOPs each per layer in the forward pass, times 3 for forward plus backward.
Token-embedding lookups are not matmuls either, but with tied weights the same matrix is the LM head, which
is one; counting it keeps the formula the same as nanoGPT and PaLM.
"""

from model.config import ModelConfig


def matmul_params(num_params: int, cfg: ModelConfig) -> int:
    position_table = cfg.max_seq_len * cfg.n_embd if cfg.arch == "gpt2" else 0
    return num_params - position_table


def flops_per_token(num_params: int, cfg: ModelConfig, seq_len: int) -> float:
    return 6.0 * matmul_params(num_params, cfg) + 12.0 * cfg.n_layer * cfg.n_embd * seq_len


def mfu(tokens_per_second: float, num_params: int, cfg: ModelConfig, seq_len: int,
        peak_flops_per_worker: float, world_size: int) -> float:
    """Achieved model FLOP/s over the peak FLOP/s of all workers; 1.0 would be every unit busy."""
    achieved = flops_per_token(num_params, cfg, seq_len) * tokens_per_second
    return achieved / (peak_flops_per_worker * world_size)
