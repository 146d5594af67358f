"""Typed schema for the `model` config group."""

from dataclasses import dataclass

from common.errors import require

# Architecture -> family. The family decides which heads exist and how FLOPs are counted.
FAMILIES = {"gpt2": "decoder", "llama": "decoder", "bert": "encoder", "t5": "encoder_decoder"}
ARCHITECTURES = tuple(FAMILIES)


@dataclass
class ModelConfig:
    name: str = "gpt-tiny"
    # gpt2 (learned positions, GELU), llama (RoPE, RMSNorm, SwiGLU), bert (encoder), t5 (encoder-decoder)
    arch: str = "gpt2"
    n_layer: int = 2  # t5: encoder layers
    n_decoder_layer: int | None = None  # t5 only: decoder layers; None means n_layer
    n_head: int = 4
    n_kv_head: int | None = None  # llama only: grouped-query attention; None means n_head
    n_embd: int = 64
    intermediate_size: int | None = None  # None: 4*n_embd (gpt2, bert, t5), ~8/3*n_embd for llama
    max_seq_len: int = 128  # positions the model supports; data.seq_len must fit
    type_vocab_size: int = 2  # bert only: segment (token type) embeddings
    dropout: float = 0.0
    tie_embeddings: bool = True
    # The tokenizer decides the real vocab; pad the embedding so matmuls hit tensor-core-friendly shapes.
    pad_vocab_to_multiple: int = 64
    init_std: float = 0.02
    # A local Hugging Face model directory (config.json + weights + tokenizer) to start from instead of
    # initialising; its config.json decides the shape, and its tokenizer replaces a trained one.
    pretrained: str | None = None

    @property
    def family(self) -> str:
        return FAMILIES[self.arch]

    @property
    def decoder_layers(self) -> int:
        return self.n_decoder_layer or self.n_layer

    def validate(self, at: str = "model") -> None:
        require(self.arch in ARCHITECTURES, f"{at}.arch", self.arch, f"one of {', '.join(ARCHITECTURES)}")
        for key in ("n_layer", "n_head", "n_embd", "max_seq_len", "pad_vocab_to_multiple", "type_vocab_size"):
            require(getattr(self, key) > 0, f"{at}.{key}", getattr(self, key), "a positive integer")
        require(self.n_embd % self.n_head == 0, f"{at}.n_embd", self.n_embd,
                f"a multiple of model.n_head ({self.n_head})")
        kv = self.n_kv_head or self.n_head
        require(self.n_head % kv == 0, f"{at}.n_kv_head", self.n_kv_head,
                f"a divisor of model.n_head ({self.n_head})")
        require(self.arch == "llama" or self.n_kv_head is None, f"{at}.n_kv_head", self.n_kv_head,
                "null unless model.arch=llama")
        require(self.arch == "t5" or self.n_decoder_layer is None, f"{at}.n_decoder_layer", self.n_decoder_layer,
                "null unless model.arch=t5")
        require(0.0 <= self.dropout < 1.0, f"{at}.dropout", self.dropout, "a float in [0, 1)")
