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
CLS = "<|cls|>"
SEP = "<|sep|>"
SPECIAL_TOKENS = [EOS, PAD, UNK, MASK]
# The roles a sample spec can require, and the token a trained tokenizer gets for each.
ROLES = {"eos": ("eos_token", EOS), "mask": ("mask_token", MASK), "cls": ("cls_token", CLS),
         "sep": ("sep_token", SEP)}


def sentinel(i: int) -> str:
    """T5's name for span corruption's i-th placeholder; pretrained T5 tokenizers already hold them."""
    return f"<extra_id_{i}>"


def train_tokenizer(texts: Iterable[str], cfg: TokenizerConfig, roles: tuple[str, ...] = (),
                    sentinels: int = 0) -> PreTrainedTokenizerFast:
    """A tokenizer trained on `texts` holding EOS, PAD, UNK and MASK (ids 0-3, as always), plus CLS and SEP
    when `roles` asks for them and `sentinels` T5 sentinel tokens; these come after, so the ids of a
    causal-LM tokenizer never change."""
    if cfg.kind == "pretrained":
        return with_special_tokens(load_tokenizer(cfg.path), cfg.path, roles, sentinels)
    extra = [CLS, SEP] if {"cls", "sep"} & set(roles) else []
    specials = SPECIAL_TOKENS + extra + [sentinel(i) for i in range(sentinels)]
    if cfg.kind == "byte_bpe":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        trainer = trainers.BpeTrainer(vocab_size=cfg.vocab_size, min_frequency=cfg.min_frequency,
                                      special_tokens=specials,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    elif cfg.kind == "wordpiece":
        tok = Tokenizer(models.WordPiece(unk_token=UNK))
        tok.normalizer = normalizers.NFKC()
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(vocab_size=cfg.vocab_size, min_frequency=cfg.min_frequency,
                                            special_tokens=specials, show_progress=False)
    else:  # unigram
        tok = Tokenizer(models.Unigram())
        tok.normalizer = normalizers.NFKC()
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        trainer = trainers.UnigramTrainer(vocab_size=cfg.vocab_size, special_tokens=specials,
                                          unk_token=UNK, show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    named = {"cls_token": CLS, "sep_token": SEP} if extra else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=PAD,
                                   unk_token=UNK, mask_token=MASK, **named,
                                   additional_special_tokens=[sentinel(i) for i in range(sentinels)] or None)


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """The tokenizer saved in `path`, as it is: a missing pad token stays missing.

    Aliasing pad to EOS (the usual fix for GPT-2's tokenizer) would make every document separator look
    like padding; lmforge pads by length instead (see model.objectives.clm.collate).
    """
    path = Path(path)
    if not (path / "tokenizer.json").is_file():
        raise LmforgeError(f"no tokenizer.json in tokenizer directory {path}")
    return PreTrainedTokenizerFast.from_pretrained(str(path), local_files_only=True)


def with_special_tokens(tok: PreTrainedTokenizerFast, path: str | Path, roles: tuple[str, ...],
                        sentinels: int) -> PreTrainedTokenizerFast:
    """A given tokenizer, checked for the tokens an objective needs. Missing sentinels are added (the model's
    embedding grows to cover them); a missing role token is an error, because inventing a [MASK] or [SEP]
    for a published model would give it a token it never learned."""
    for role in roles:
        attribute = ROLES[role][0]
        if getattr(tok, f"{attribute}_id") is None:
            raise LmforgeError(f"tokenizer in {path} has no {role} token ({attribute}), which this objective "
                               f"needs; use a tokenizer that has one, or let lmforge train one")
    missing = [sentinel(i) for i in range(sentinels) if tok.convert_tokens_to_ids(sentinel(i)) in (None, tok.unk_token_id)]
    if missing:
        tok.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    return tok


def special_ids(tok: PreTrainedTokenizerFast, sentinels: int) -> dict:
    """The manifest's record of the ids objectives treat specially."""
    return {"mask_id": tok.mask_token_id, "cls_id": tok.cls_token_id, "sep_id": tok.sep_token_id,
            "unk_id": tok.unk_token_id, "special_ids": sorted(set(tok.all_special_ids)),
            "sentinel_ids": tok.convert_tokens_to_ids([sentinel(i) for i in range(sentinels)])}
