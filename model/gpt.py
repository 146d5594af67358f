"""Build a decoder-only language model with HF transformers from a ModelConfig, from scratch."""

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedModel

from model.config import ModelConfig


def padded_vocab_size(cfg: ModelConfig, vocab_size: int) -> int:
    multiple = cfg.pad_vocab_to_multiple
    return (vocab_size + multiple - 1) // multiple * multiple


def embedding_rows(state_dict: dict[str, torch.Tensor]) -> int:
    """The (padded) vocabulary size a saved model was built with: the rows of its input embedding."""
    for key, tensor in state_dict.items():
        if key.endswith(("wte.weight", "embed_tokens.weight")):
            return tensor.shape[0]
    raise KeyError("no input embedding (wte / embed_tokens) in the state dict")


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


def build_model(cfg: ModelConfig, vocab_size: int, seed: int, bos_id: int | None = None,
                eos_id: int | None = None, pad_id: int | None = None) -> PreTrainedModel:
    """A freshly initialised causal LM whose weights depend only on `seed`, identical on every rank.

    `vocab_size` is the data's (a tokenizer's length, or a token file's declared vocabulary); the special
    ids only go into the HF config, for generation, and may be None when the data has no tokenizer.
    """
    config = hf_config(cfg, padded_vocab_size(cfg, vocab_size), bos_id, eos_id, pad_id)
    # SDPA is the fast path on GPU and deterministic on CPU; eager is only needed for attention plots.
    config._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model_class = GPT2LMHeadModel if cfg.arch == "gpt2" else LlamaForCausalLM
        return model_class(config)
