"""Train or load an HF `tokenizers` tokenizer and wrap it as a transformers fast tokenizer."""

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from common.errors import LmforgeError
from data.config import TokenizerConfig

EOS = "<|endoftext|>"
PAD = "<|pad|>"
UNK = "<|unk|>"
MASK = "<|mask|>"
SPECIAL_TOKENS = [EOS, PAD, UNK, MASK]


def train_tokenizer(texts: Iterable[str], cfg: TokenizerConfig) -> PreTrainedTokenizerFast:
    if cfg.kind == "pretrained":
        return require_separator(load_tokenizer(cfg.path), cfg.path)
    if cfg.kind == "byte_bpe":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        trainer = trainers.BpeTrainer(vocab_size=cfg.vocab_size, min_frequency=cfg.min_frequency,
                                      special_tokens=SPECIAL_TOKENS,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    elif cfg.kind == "wordpiece":
        tok = Tokenizer(models.WordPiece(unk_token=UNK))
        tok.normalizer = normalizers.NFKC()
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(vocab_size=cfg.vocab_size, min_frequency=cfg.min_frequency,
                                            special_tokens=SPECIAL_TOKENS, show_progress=False)
    else:  # unigram
        tok = Tokenizer(models.Unigram())
        tok.normalizer = normalizers.NFKC()
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        trainer = trainers.UnigramTrainer(vocab_size=cfg.vocab_size, special_tokens=SPECIAL_TOKENS,
                                          unk_token=UNK, show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=PAD,
                                   unk_token=UNK, mask_token=MASK)


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """The tokenizer saved in `path`, as it is: a missing pad token stays missing.

    Aliasing pad to EOS (the usual fix for GPT-2's tokenizer) would make every document separator look
    like padding; lmforge pads by length instead (see model.objectives.clm.collate).
    """
    path = Path(path)
    if not (path / "tokenizer.json").is_file():
        raise LmforgeError(f"no tokenizer.json in tokenizer directory {path}")
    return PreTrainedTokenizerFast.from_pretrained(str(path), local_files_only=True)


def require_separator(tok: PreTrainedTokenizerFast, path: str | Path) -> PreTrainedTokenizerFast:
    """`tok`, when it has the end-of-text token that text preparation puts between documents."""
    if tok.eos_token_id is None:
        raise LmforgeError(f"tokenizer in {path} has no eos token; lmforge needs one as document separator")
    return tok
