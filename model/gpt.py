"""HF configs of the decoder-only architectures (gpt2, llama); model.build builds every architecture."""

from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedModel

from model.config import ModelConfig


def padded_vocab_size(cfg: ModelConfig, vocab_size: int) -> int:
    multiple = cfg.pad_vocab_to_multiple
    return (vocab_size + multiple - 1) // multiple * multiple


def hf_config(cfg: ModelConfig, vocab_size: int, bos_id: int | None, eos_id: int | None, pad_id: int | None):
    if cfg.arch == "gpt2":
        return GPT2Config(
            vocab_size=vocab_size, n_positions=cfg.max_seq_len, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
            n_head=cfg.n_head, n_inner=cfg.intermediate_size, resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout,
            attn_pdrop=cfg.dropout, initializer_range=cfg.init_std, tie_word_embeddings=cfg.tie_embeddings,
            bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id, use_cache=False)
    # SwiGLU has three projections, so 8/3*d keeps the MLP's parameter count near a GELU MLP of 4*d.
    intermediate = cfg.intermediate_size or 256 * ((int(8 * cfg.n_embd / 3) + 255) // 256)
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=cfg.n_embd, intermediate_size=intermediate,
        num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head,
        num_key_value_heads=cfg.n_kv_head or cfg.n_head, max_position_embeddings=cfg.max_seq_len,
        attention_dropout=cfg.dropout, initializer_range=cfg.init_std, tie_word_embeddings=cfg.tie_embeddings,
        bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id, use_cache=False)


def decoder_class(cfg: ModelConfig) -> type[PreTrainedModel]:
    return GPT2LMHeadModel if cfg.arch == "gpt2" else LlamaForCausalLM
