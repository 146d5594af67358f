"""Build any architecture with the head an objective asks for, from config or from a published checkpoint.

One registry maps (model.arch, head) to the HF class; `hf_config` turns a ModelConfig into the HF config of
its architecture. A model built from `model.pretrained` takes its shape from that directory's config.json
(see `pretrained_shape`, which fills the ModelConfig so FLOPs and names stay right).
"""

import json
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    BertConfig,
    BertForMaskedLM,
    BertForPreTraining,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertForTokenClassification,
    BertModel,
    PreTrainedModel,
    T5Config,
    T5EncoderModel,
    T5ForConditionalGeneration,
)

from common.errors import LmforgeError
from model.config import ModelConfig
from model.gpt import decoder_class, padded_vocab_size
from model.gpt import hf_config as decoder_config

HEADS = {
    "gpt2": {"causal_lm": "decoder"}, "llama": {"causal_lm": "decoder"},
    "bert": {"masked_lm": BertForMaskedLM, "pretraining": BertForPreTraining, "encoder": BertModel,
             "seq_cls": BertForSequenceClassification, "token_cls": BertForTokenClassification,
             "qa": BertForQuestionAnswering},
    "t5": {"seq2seq_lm": T5ForConditionalGeneration, "encoder": T5EncoderModel},
}
# Input-embedding weight names, by architecture, in a saved state dict.
EMBEDDING_SUFFIXES = ("wte.weight", "embed_tokens.weight", "word_embeddings.weight", "shared.weight")


def model_class(cfg: ModelConfig, head: str) -> type[PreTrainedModel]:
    heads = HEADS[cfg.arch]
    if head not in heads:
        raise LmforgeError(f"model.arch={cfg.arch} has no {head} head (it has {', '.join(heads)}); "
                           f"choose a model that fits the objective")
    return decoder_class(cfg) if heads[head] == "decoder" else heads[head]


def hf_config(cfg: ModelConfig, vocab_size: int, bos_id=None, eos_id=None, pad_id=None):
    if cfg.family == "decoder":
        return decoder_config(cfg, vocab_size, bos_id, eos_id, pad_id)
    ff = cfg.intermediate_size or 4 * cfg.n_embd
    if cfg.arch == "bert":
        return BertConfig(
            vocab_size=vocab_size, hidden_size=cfg.n_embd, num_hidden_layers=cfg.n_layer,
            num_attention_heads=cfg.n_head, intermediate_size=ff, hidden_dropout_prob=cfg.dropout,
            attention_probs_dropout_prob=cfg.dropout, max_position_embeddings=cfg.max_seq_len,
            type_vocab_size=cfg.type_vocab_size, initializer_range=cfg.init_std, pad_token_id=pad_id,
            tie_word_embeddings=cfg.tie_embeddings)
    # T5 starts decoding from its pad token, and its relative positions need no position table.
    return T5Config(
        vocab_size=vocab_size, d_model=cfg.n_embd, d_kv=cfg.n_embd // cfg.n_head, d_ff=ff, num_layers=cfg.n_layer,
        num_decoder_layers=cfg.decoder_layers, num_heads=cfg.n_head, dropout_rate=cfg.dropout,
        feed_forward_proj="relu", tie_word_embeddings=cfg.tie_embeddings, pad_token_id=pad_id,
        eos_token_id=eos_id, decoder_start_token_id=pad_id, use_cache=False)


def build_model(cfg: ModelConfig, vocab_size: int, seed: int, head: str = "causal_lm", bos_id: int | None = None,
                eos_id: int | None = None, pad_id: int | None = None, load_weights: bool = True,
                head_config: dict | None = None) -> PreTrainedModel:
    """A model whose weights depend only on `seed` (identical on every rank), or the weights of
    `cfg.pretrained` when `load_weights` (export builds the structure only and loads a checkpoint into it).

    `vocab_size` is the data's (a tokenizer's length, or a token file's declared vocabulary); the special
    ids only go into the HF config and may be None when the data has no tokenizer. `head_config`: what a
    fine-tuning task's head needs in the HF config (num_labels, id2label, label2id, problem_type).
    """
    cls = model_class(cfg, head)
    extra = {"add_pooling_layer": False} if cls is BertModel else {}  # a sentence encoder pools itself
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # a pretrained model's new head is initialised from the seed too
        if cfg.pretrained:
            config = AutoConfig.from_pretrained(cfg.pretrained, local_files_only=True, **(head_config or {}))
            model = (cls.from_pretrained(cfg.pretrained, config=config, local_files_only=True, **extra)
                     if load_weights else cls(config, **extra))
            if vocab_size > model.get_input_embeddings().num_embeddings:  # the tokenizer gained sentinels
                model.resize_token_embeddings(padded_vocab_size(cfg, vocab_size))
            return model
        config = hf_config(cfg, padded_vocab_size(cfg, vocab_size), bos_id, eos_id, pad_id)
        for key, value in (head_config or {}).items():
            setattr(config, key, value)
        # SDPA is the fast path on GPU and deterministic on CPU; eager is only needed for attention plots.
        config._attn_implementation = "sdpa" if cfg.arch != "t5" else "eager"
        return cls(config, **extra)


def embedding_rows(state_dict: dict[str, torch.Tensor]) -> int:
    """The (padded) vocabulary size a saved model was built with: the rows of its input embedding."""
    for key, tensor in state_dict.items():
        if key.endswith(EMBEDDING_SUFFIXES):
            return tensor.shape[0]
    raise KeyError("no input embedding in the state dict")


def pretrained_shape(path: str, arch: str) -> dict:
    """The ModelConfig fields a published checkpoint's config.json decides; a clear error when `path` is no
    HF model directory or holds another architecture than `arch`."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise LmforgeError(f"model.pretrained={path} is not a Hugging Face model directory (no config.json)")
    hf = json.loads(config_file.read_text())
    model_type = hf.get("model_type")
    if model_type != arch:
        raise LmforgeError(f"model.pretrained={path} holds a {model_type} model, but model.arch={arch}")
    if arch == "bert":
        return {"n_layer": hf["num_hidden_layers"], "n_head": hf["num_attention_heads"], "n_embd": hf["hidden_size"],
                "intermediate_size": hf["intermediate_size"], "max_seq_len": hf["max_position_embeddings"],
                "type_vocab_size": hf.get("type_vocab_size", 2), "dropout": hf.get("hidden_dropout_prob", 0.1)}
    if arch == "t5":
        return {"n_layer": hf["num_layers"], "n_decoder_layer": hf.get("num_decoder_layers") or hf["num_layers"],
                "n_head": hf["num_heads"], "n_embd": hf["d_model"], "intermediate_size": hf["d_ff"],
                "dropout": hf.get("dropout_rate", 0.1), "tie_embeddings": hf.get("tie_word_embeddings", True)}
    if arch == "gpt2":
        return {"n_layer": hf["n_layer"], "n_head": hf["n_head"], "n_embd": hf["n_embd"],
                "intermediate_size": hf.get("n_inner"), "max_seq_len": hf["n_positions"],
                "tie_embeddings": hf.get("tie_word_embeddings", True)}
    return {"n_layer": hf["num_hidden_layers"], "n_head": hf["num_attention_heads"],
            "n_kv_head": hf.get("num_key_value_heads"), "n_embd": hf["hidden_size"],
            "intermediate_size": hf["intermediate_size"], "max_seq_len": hf["max_position_embeddings"],
            "tie_embeddings": hf.get("tie_word_embeddings", False)}
