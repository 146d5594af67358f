"""Export a trained sentence encoder so `sentence_transformers.SentenceTransformer(directory)` loads it.

The directory already holds the HF encoder (`save_pretrained`: config.json and weights) and its tokenizer;
this adds the module layout sentence-transformers reads: the encoder in the root (Transformer), then a
Pooling module matching the objective's pooling, then Normalize, so `encode()` returns the unit vectors the
contrastive loss compared. The files are written directly, since lmforge does not depend on
sentence-transformers; they use the layout every release since 2.0 loads (6.x maps the `models.*` class
names to its own modules), with only the keys those releases all accept.
"""

import json
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from common.errors import LmforgeError
from model.objectives.config import POOLINGS

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "spiece.model")


def _installed(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _write_json(path: Path, value) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2) + "\n", encoding="utf8")


def save_sentence_transformer(directory: Path, pooling: str, max_seq_length: int) -> None:
    """Add the sentence-transformers files to `directory` (an HF encoder and tokenizer saved there).

    `pooling`: "mean" or "cls", as trained; `max_seq_length`: the longest input `encode()` passes to the
    encoder (longer sentences are truncated), at most the model's position table."""
    directory = Path(directory)
    if pooling not in POOLINGS:
        raise LmforgeError(f"pooling={pooling!r} cannot be exported; expected one of {', '.join(POOLINGS)}")
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise LmforgeError(f"{directory} holds no config.json: save the encoder with save_pretrained first")
    if not any((directory / name).is_file() for name in TOKENIZER_FILES):
        raise LmforgeError(f"{directory} holds no tokenizer files ({', '.join(TOKENIZER_FILES)}): "
                           f"sentence-transformers tokenizes the sentences itself, so the tokenizer must be saved")
    config = json.loads(config_path.read_text(encoding="utf8"))
    width = config.get("hidden_size", config.get("d_model"))  # BERT-style, T5-style
    if not isinstance(width, int):
        raise LmforgeError(f"{config_path} gives no hidden_size or d_model: cannot tell the embedding width")
    positions = config.get("max_position_embeddings")  # None for T5: relative positions have no table
    if not isinstance(max_seq_length, int) or max_seq_length < 1 or (positions and max_seq_length > positions):
        raise LmforgeError(f"max_seq_length={max_seq_length!r} cannot be exported; expected an int in "
                           f"[1, {positions or 'any'}] (the model's max_position_embeddings)")

    _write_json(directory / "modules.json", [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ])
    # The tokenizer lower-cases (or not) by its own config; lower-casing again here would change its ids.
    _write_json(directory / "sentence_bert_config.json", {"max_seq_length": max_seq_length, "do_lower_case": False})
    _write_json(directory / "1_Pooling" / "config.json", {
        "word_embedding_dimension": width,
        "pooling_mode_cls_token": pooling == "cls",
        "pooling_mode_mean_tokens": pooling == "mean",
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
    })
    (directory / "2_Normalize").mkdir(exist_ok=True)  # Normalize has no parameters and no config
    # No sentence_transformers version: the exporting machine need not have it, and a version newer than
    # the reader's only triggers a warning there.
    versions = {name: v for name, v in (("transformers", _installed("transformers")),
                                        ("pytorch", _installed("torch"))) if v}
    _write_json(directory / "config_sentence_transformers.json", {
        "__version__": versions, "prompts": {}, "default_prompt_name": None,
        "similarity_fn_name": "cosine", "model_type": "SentenceTransformer",
    })
