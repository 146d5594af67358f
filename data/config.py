"""Typed schema for the `data` config group."""

from dataclasses import dataclass, field

from omegaconf import II

from orchestrator.errors import require

SOURCES = ("embedded", "text", "jsonl", "csv", "parquet", "hf_disk", "webdataset", "tokens")
TOKENIZER_KINDS = ("byte_bpe", "wordpiece", "unigram", "pretrained")


@dataclass
class TokenizerConfig:
    kind: str = "byte_bpe"
    vocab_size: int = 4096
    min_frequency: int = 2
    path: str | None = None  # an existing tokenizer directory; required when kind=pretrained

    def validate(self, at: str) -> None:
        require(self.kind in TOKENIZER_KINDS, f"{at}.kind", self.kind, f"one of {', '.join(TOKENIZER_KINDS)}")
        require(self.vocab_size >= 256, f"{at}.vocab_size", self.vocab_size, "an integer >= 256")
        require(self.kind != "pretrained" or bool(self.path), f"{at}.path", self.path,
                "a tokenizer directory when kind=pretrained")


@dataclass
class DataConfig:
    name: str = "pydoc"
    source: str = "embedded"
    paths: list[str] = field(default_factory=list)  # files, globs, URLs or fsspec URIs
    text_field: str = "text"
    seq_len: int = II("model.max_seq_len")  # tokens per packed block
    val_fraction: float = 0.05  # held out by document, before tokenization
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    shuffle: bool = True
    lenient: bool = False  # skip and count bad records instead of failing

    def validate(self, at: str = "data") -> None:
        require(self.source in SOURCES, f"{at}.source", self.source, f"one of {', '.join(SOURCES)}")
        require(self.source == "embedded" or bool(self.paths), f"{at}.paths", self.paths,
                f"at least one path when data.source={self.source}")
        require(self.seq_len > 1, f"{at}.seq_len", self.seq_len, "an integer > 1")
        require(0.0 < self.val_fraction < 0.5, f"{at}.val_fraction", self.val_fraction, "a float in (0, 0.5)")
        self.tokenizer.validate(f"{at}.tokenizer")
