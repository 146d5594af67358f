"""Training FLOPs and model FLOPs utilisation (MFU).

`flops_per_token` is the PaLM paper's appendix B estimate for decoders. Per token, a forward+backward pass
over the dense weights costs 6N FLOPs (2 forward, 4 backward), where N counts the parameters that take part
in matmuls: everything except position embeddings, which are a table lookup. Attention's score and value
products add 12 * n_layer * n_embd * seq_len: 2 matmuls (QK^T and AV) of 2 * seq_len * n_embd FLOPs each per
layer in the forward pass, times 3 for forward plus backward. Token-embedding lookups are not matmuls either,
but with tied weights the same matrix is the LM head, which is one; counting it keeps the formula the same as
nanoGPT and PaLM.

`step_flops` counts every architecture from the config's shapes instead of a parameter count, so it holds
for a model loaded from a checkpoint as well as one built here, and for encoders and encoder-decoders whose
heads and cross-attention a per-parameter count cannot place. It counts 2 FLOPs per multiply-add of every
matmul in the forward pass, times 3: the backward pass of a matmul computes the gradients of both its
operands (input and weight, or queries and keys), each as large as the forward product. Attention is counted
over the full seq_len x seq_len matrix, as the eager and SDPA kernels compute it (a causal mask hides half of
it but does not skip it).

Left out because they are not matmuls and cost a small fraction of what the matmuls do: embedding lookups
(tokens, learned positions, BERT segments, T5 relative-position buckets), RoPE, layer norms and RMSNorm,
biases, softmax, activation functions and SwiGLU's gating product, dropout, T5's rescaling of the decoder
output, and the loss.
"""

from model.config import ModelConfig

HEADS = ("causal_lm", "masked_lm", "pretraining", "seq2seq_lm", "encoder")
# The heads a model of each family can carry; `encoder` on an encoder-decoder is its encoder stack alone
# (a T5 sentence encoder).
FAMILY_HEADS = {
    "decoder": ("causal_lm",),
    "encoder": ("masked_lm", "pretraining", "encoder", "seq_cls", "token_cls", "qa"),
    "encoder_decoder": ("seq2seq_lm", "encoder"),
}
FLOPS_PER_MULTIPLY_ADD = 2
FORWARD_AND_BACKWARD = 3
NEXT_SENTENCE_CLASSES = 2


def matmul_params(num_params: int, cfg: ModelConfig) -> int:
    position_table = cfg.max_seq_len * cfg.n_embd if cfg.arch == "gpt2" else 0
    return num_params - position_table


def flops_per_token(num_params: int, cfg: ModelConfig, seq_len: int) -> float:
    return 6.0 * matmul_params(num_params, cfg) + 12.0 * cfg.n_layer * cfg.n_embd * seq_len


def ffn_width(cfg: ModelConfig) -> int:
    """The MLP's hidden width; the defaults are those model building uses when intermediate_size is None."""
    if cfg.intermediate_size is not None:
        return cfg.intermediate_size
    if cfg.arch == "llama":
        # SwiGLU has three projections, so ~8/3*d keeps its weights near a 2-matrix MLP of 4*d.
        return 256 * ((int(8 * cfg.n_embd / 3) + 255) // 256)
    return 4 * cfg.n_embd


def self_attention_projection_macs(cfg: ModelConfig) -> int:
    """Multiply-adds per token of Q, K, V and the output projection. With grouped-query attention K and V
    have only n_kv_head heads; T5's d_kv is n_embd / n_head, so its projections are square too."""
    d = cfg.n_embd
    kv_width = (cfg.n_kv_head or cfg.n_head) * (d // cfg.n_head)
    return d * d + 2 * d * kv_width + d * d


def mlp_macs(cfg: ModelConfig) -> int:
    # llama's SwiGLU has gate, up and down matrices; GPT-2's, BERT's and T5's MLPs have up and down.
    matrices = 3 if cfg.arch == "llama" else 2
    return matrices * cfg.n_embd * ffn_width(cfg)


def attention_macs(cfg: ModelConfig, keys: int) -> int:
    """Multiply-adds per query token of QK^T and of the probabilities times V: keys * n_embd each. Grouped
    K and V are repeated to every query head, so GQA does not shrink them."""
    return 2 * keys * cfg.n_embd


def step_flops(cfg: ModelConfig, vocab_rows: int, head: str, tokens: int, seq_len: int,
               decoder_tokens: int = 0, decoder_seq_len: int = 0) -> float:
    """Training FLOPs (forward + backward = 3x forward) of one step that processed `tokens` input tokens in
    sequences padded to `seq_len`, and for encoder-decoders `decoder_tokens` target tokens in sequences of
    `decoder_seq_len`.

    `vocab_rows` is the (padded) row count of the LM head or MLM decoder. Pass batch * seq_len as `tokens` to
    count what the hardware ran, padding included, or the real tokens to count useful work only. The MLM
    head runs over every position, as HF's BertForMaskedLM computes it, not only over the masked ones. The
    BERT pooler and next-sentence classifier of `pretraining` run on one token per sequence and are counted
    once per round(tokens / seq_len) sequences. The `encoder` head pools by averaging, which is no matmul.
    """
    if head not in FAMILY_HEADS[cfg.family]:
        raise ValueError(f"head {head!r} does not fit model.arch={cfg.arch} ({cfg.family}); "
                         f"it takes one of {', '.join(FAMILY_HEADS[cfg.family])}")
    if head == "seq2seq_lm" and decoder_tokens > 0 and decoder_seq_len <= 0:
        raise ValueError(f"head 'seq2seq_lm' with {decoder_tokens} decoder tokens needs their "
                         "decoder_seq_len")
    if head != "seq2seq_lm" and (decoder_tokens or decoder_seq_len):
        raise ValueError(f"head {head!r} has no decoder stack: decoder_tokens and decoder_seq_len must be 0")
    d = cfg.n_embd
    # Decoders, encoders and the encoder stack of an encoder-decoder share this layer: self-attention, MLP.
    layer = self_attention_projection_macs(cfg) + mlp_macs(cfg) + attention_macs(cfg, seq_len)
    macs = tokens * cfg.n_layer * layer
    if head == "causal_lm":
        macs += tokens * d * vocab_rows
    elif head in ("masked_lm", "pretraining"):
        mlm_transform, mlm_decoder = d * d, d * vocab_rows
        macs += tokens * (mlm_transform + mlm_decoder)
        if head == "pretraining":
            pooler, next_sentence = d * d, d * NEXT_SENTENCE_CLASSES
            macs += round(tokens / seq_len) * (pooler + next_sentence)
    elif head == "seq_cls":
        # The pooler runs once per sequence; the classifier's few outputs per sequence are negligible, and
        # so are token_cls's and qa's per-token projections to a handful of labels (under 1% of a layer).
        macs += round(tokens / seq_len) * d * d
    elif head == "seq2seq_lm":
        # Cross-attention's K and V project the encoder's output once per decoder layer, so every encoder
        # token pays them, however long the target is.
        cross_key_value = 2 * d * d
        macs += tokens * cfg.decoder_layers * cross_key_value
        cross_query_output = 2 * d * d
        decoder_layer = (self_attention_projection_macs(cfg) + attention_macs(cfg, decoder_seq_len)
                         + cross_query_output + attention_macs(cfg, seq_len) + mlp_macs(cfg))
        macs += decoder_tokens * (cfg.decoder_layers * decoder_layer + d * vocab_rows)
    return float(FLOPS_PER_MULTIPLY_ADD * FORWARD_AND_BACKWARD * macs)


def mfu_of(flops_per_second: float, peak_flops_per_worker: float, world_size: int) -> float:
    """Achieved FLOP/s over the peak FLOP/s of all workers; 1.0 would be every unit busy."""
    return flops_per_second / (peak_flops_per_worker * world_size)


def mfu(tokens_per_second: float, num_params: int, cfg: ModelConfig, seq_len: int,
        peak_flops_per_worker: float, world_size: int) -> float:
    """Achieved model FLOP/s over the peak FLOP/s of all workers; 1.0 would be every unit busy."""
    return mfu_of(flops_per_token(num_params, cfg, seq_len) * tokens_per_second, peak_flops_per_worker,
                  world_size)
