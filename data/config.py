"""Typed schema for the `data` config group."""

from dataclasses import dataclass, field

from omegaconf import II

from common.errors import require

SOURCES = ("embedded", "text", "jsonl", "csv", "parquet", "hf_disk", "webdataset", "tokens", "conll", "squad",
           "builtin")
# Sources of labelled records for fine-tuning: conll (token-per-line NER), squad (SQuAD JSON), builtin (data
# that ships with lmforge or a package: see data.builtin); jsonl, csv, parquet and hf_disk serve both.
RECORD_SOURCES = ("jsonl", "csv", "parquet", "hf_disk", "conll", "squad", "builtin")
TOKENIZER_KINDS = ("byte_bpe", "wordpiece", "unigram", "pretrained")
TEXT_UNITS = ("file", "paragraph", "line")
ENGINES = ("auto", "ray", "local")
TOKEN_DTYPES = ("auto", "uint16", "uint32")
UNICODE_FORMS = ("NFC", "NFKC", "none")


@dataclass
class TokenizerConfig:
    kind: str = "byte_bpe"
    vocab_size: int = 4096
    min_frequency: int = 2
    path: str | None = None  # an existing tokenizer directory; required when kind=pretrained
    # Documents sampled to train the tokenizer; BPE training time grows with text, not with vocab.
    train_docs: int = 100_000

    def validate(self, at: str) -> None:
        require(self.kind in TOKENIZER_KINDS, f"{at}.kind", self.kind, f"one of {', '.join(TOKENIZER_KINDS)}")
        require(self.vocab_size >= 256, f"{at}.vocab_size", self.vocab_size, "an integer >= 256")
        require(self.kind != "pretrained" or bool(self.path), f"{at}.path", self.path,
                "a tokenizer directory when kind=pretrained")
        require(self.train_docs >= 1, f"{at}.train_docs", self.train_docs, "an integer >= 1")


@dataclass
class CleanConfig:
    strip_html: bool = False  # HTML documents only (see data.clean.is_html): keep the visible text
    unicode: str = "NFC"  # normalization form, or none
    min_chars: int = 1  # documents shorter than this after cleaning are dropped and counted
    dedup: bool = True  # drop exact duplicates (by hash of the cleaned text)
    near_dedup: bool = False  # also drop near-duplicates: datasketch MinHash LSH over word 5-grams
    near_dedup_threshold: float = 0.8  # estimated Jaccard similarity at which a document is a near-duplicate

    def validate(self, at: str) -> None:
        require(self.unicode in UNICODE_FORMS, f"{at}.unicode", self.unicode, f"one of {', '.join(UNICODE_FORMS)}")
        require(self.min_chars >= 1, f"{at}.min_chars", self.min_chars, "an integer >= 1")
        require(0.0 < self.near_dedup_threshold <= 1.0, f"{at}.near_dedup_threshold", self.near_dedup_threshold,
                "a float in (0, 1]")


@dataclass
class ColumnMap:
    """Fine-tuning record keys -> the user's column names: data.column_map.text=review data.column_map.label=stars.
    A key left null is read from the column of its own name."""

    text: str | None = None  # seq_cls: the text, and text_pair for a second text (NLI, paraphrase)
    text_pair: str | None = None
    label: str | None = None  # seq_cls: a label name, or a list of names with objective.multi_label=true
    tokens: str | None = None  # token_cls: a list of words, and tags: their BIO tags
    tags: str | None = None
    id: str | None = None  # extractive_qa: question id, question, context, and SQuAD-style answers
    question: str | None = None
    context: str | None = None
    answers: str | None = None
    source: str | None = None  # seq2seq: the input text and the target (summary, translation)
    target: str | None = None
    messages: str | None = None  # dialogue: [{role, content}, ...]

    def column(self, key: str) -> str:
        return getattr(self, key, None) or key


@dataclass
class DataConfig:
    name: str = "pydoc"
    source: str = "embedded"
    paths: list[str] = field(default_factory=list)  # files, globs, URLs, pipe: commands or fsspec URIs
    text_field: str = "text"  # record field (jsonl/csv/parquet/hf_disk) or member extension (webdataset)
    columns: list[str] = field(default_factory=list)  # if set, these fields joined by a blank line are the text
    # Fine-tuning: which of the user's columns holds each record key a task reads (unnamed keys: the same name)
    column_map: ColumnMap = field(default_factory=ColumnMap)
    # Fine-tuning: validation records from these files; empty: val_fraction of data.paths, held out by record.
    val_paths: list[str] = field(default_factory=list)
    text_unit: str = "file"  # source=text: one document per file, paragraph or line
    seq_len: int = II("model.max_seq_len")  # tokens per packed block
    val_fraction: float = 0.05  # held out by document, before tokenization
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    clean: CleanConfig = field(default_factory=CleanConfig)
    packed: bool = True  # false: one sample per document (split at seq_len), padded per batch when collated
    shard_mb: float = 64.0  # target size of one WebDataset output shard
    prepared_dir: str | None = None  # where prepared corpora go; default <paths.root>/data
    engine: str = "auto"  # ray: Ray Data map_batches; local: this process; auto: ray when a cluster is given
    max_doc_chars: int = 1_000_000  # longer documents are read and tokenized in pieces of this size
    token_dtype: str = "auto"  # source=tokens: auto reads an llm.c header or a .json sidecar
    token_vocab_size: int | None = None  # source=tokens: vocabulary size when no header or sidecar says it
    shuffle: bool = True
    lenient: bool = False  # skip and count bad records instead of failing

    def validate(self, at: str = "data") -> None:
        require(self.source in SOURCES, f"{at}.source", self.source, f"one of {', '.join(SOURCES)}")
        require(self.source == "embedded" or bool(self.paths), f"{at}.paths", self.paths,
                f"at least one path when data.source={self.source}")
        require(self.seq_len > 1, f"{at}.seq_len", self.seq_len, "an integer > 1")
        require(0.0 < self.val_fraction < 0.5, f"{at}.val_fraction", self.val_fraction, "a float in (0, 0.5)")
        require(self.text_unit in TEXT_UNITS, f"{at}.text_unit", self.text_unit, f"one of {', '.join(TEXT_UNITS)}")
        require(self.shard_mb > 0, f"{at}.shard_mb", self.shard_mb, "a number > 0")
        require(self.engine in ENGINES, f"{at}.engine", self.engine, f"one of {', '.join(ENGINES)}")
        require(self.max_doc_chars >= 1024, f"{at}.max_doc_chars", self.max_doc_chars, "an integer >= 1024")
        require(self.token_dtype in TOKEN_DTYPES, f"{at}.token_dtype", self.token_dtype,
                f"one of {', '.join(TOKEN_DTYPES)}")
        require(self.token_vocab_size is None or self.token_vocab_size >= 2, f"{at}.token_vocab_size",
                self.token_vocab_size, "null or an integer >= 2")
        require(self.source != "tokens" or self.packed, f"{at}.packed", self.packed,
                "true when data.source=tokens (a flat token file has no document boundaries to keep)")
        self.tokenizer.validate(f"{at}.tokenizer")
        self.clean.validate(f"{at}.clean")
