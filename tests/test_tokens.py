"""Token ids stay what they are: padding is tracked by length, separators keep their loss, and token files
need no tokenizer."""

import json

import numpy as np
import pytest
import torch
from data_helpers import make_cfg, make_docs

from data.config import TokenizerConfig
from data.loader import ResumableLoader
from data.prepared import open_split, open_tokenizer, prepare_training_data, read_meta, read_vocabulary
from data.tokenizer import EOS, load_tokenizer
from model.build import build_model
from model.config import ModelConfig
from model.objectives import get_objective
from model.objectives.config import ObjectiveConfig


def clm(vocab):
    return get_objective("clm")(ObjectiveConfig(), vocab, seed=0)


def gpt2_style_tokenizer(directory, texts: list[str]):
    """A byte-level BPE whose only special token is <|endoftext|>, saved like GPT-2's: no pad token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=[EOS],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS).save_pretrained(str(directory))
    return directory


def all_batches(store, batch_size: int):
    loader = ResumableLoader(store, batch_size, 0, 1, seed=0, shuffle=False)
    return [loader.next_batch() for _ in range(len(store) // batch_size)]


def test_eos_separators_carry_loss_with_a_tokenizer_that_has_no_pad_token(tmp_path):
    docs = make_docs(12, words=6) + make_docs(4, seed=1, words=30)  # short documents get padded in a batch
    path = gpt2_style_tokenizer(tmp_path / "gpt2ish", docs)
    assert load_tokenizer(path).pad_token is None, "pad must not be aliased to EOS"
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    cfg = make_cfg("jsonl", [tmp_path / "d.jsonl"], packed=False,
                   tokenizer=TokenizerConfig(kind="pretrained", path=str(path)))
    out = prepare_training_data(cfg, tmp_path / "root", 0)
    vocab = read_vocabulary(out)
    assert vocab.pad_id is None and vocab.eos_id == load_tokenizer(path).eos_token_id
    store = open_split(out, "train")
    eos_with_loss = padded = 0
    for samples in all_batches(store, 4):
        batch = clm(vocab).collate(samples, train=True)
        attends = batch.get("attention_mask", torch.ones_like(batch["input_ids"]))
        for row, sample in enumerate(samples):
            real = len(sample["input_ids"])
            labels, ids = batch["labels"][row], batch["input_ids"][row]
            at_eos = (ids[:real] == vocab.eos_id).nonzero().flatten()
            assert torch.equal(labels[at_eos], ids[at_eos]), "an end-of-text position lost its loss"
            assert attends[row][at_eos].eq(1).all() and attends[row][real:].eq(0).all()
            assert labels[real:].eq(-100).all(), "padding must carry no loss"
            eos_with_loss += len(at_eos)
            padded += len(ids) - real
    assert eos_with_loss == read_meta(out)["splits"]["train"]["documents"], "one separator per document"
    assert padded > 0, "the test must exercise padding"


@pytest.fixture
def char_vocab_file(tmp_path):
    """A character-vocabulary token file in which every id 0..V-1 is ordinary text."""
    vocab = 65
    rng = np.random.default_rng(0)
    tokens = np.concatenate([np.arange(vocab), rng.integers(0, vocab, 32 * 40)]).astype(np.uint16)
    tokens.tofile(tmp_path / "chars.bin")
    (tmp_path / "chars.bin.json").write_text(json.dumps({"dtype": "uint16", "vocab_size": vocab}))
    return tmp_path / "chars.bin", tokens, vocab


def test_token_file_needs_no_tokenizer_and_every_id_carries_loss(tmp_path, char_vocab_file):
    path, tokens, vocab_size = char_vocab_file
    out = prepare_training_data(make_cfg("tokens", [path]), tmp_path / "root", 0)
    meta = read_meta(out)
    assert open_tokenizer(out) is None
    assert (meta["vocab_size"], meta["eos_id"], meta["pad_id"]) == (vocab_size, None, None)
    stores = [open_split(out, split) for split in ("train", "val")]
    stored = np.concatenate([s[i]["input_ids"] for s in stores for i in range(len(s))])
    assert len(stored) == len(tokens) // 32 * 32, "nothing may be inserted into a token stream"
    assert set(stored.tolist()) == set(range(vocab_size))
    vocab = read_vocabulary(out)
    model = build_model(ModelConfig(n_layer=1, n_head=2, n_embd=16, max_seq_len=32), vocab.size, 0,
                        bos_id=vocab.bos_id, eos_id=vocab.eos_id, pad_id=vocab.pad_id)
    assert model.config.vocab_size >= vocab_size
    for store in stores:
        for samples in all_batches(store, 2):
            batch = clm(vocab).collate(samples, train=True)
            assert not batch["labels"].eq(-100).any(), "an id of the file's vocabulary was masked"
            assert int(batch["input_ids"].max()) < model.config.vocab_size


def test_token_file_with_a_given_tokenizer_keeps_it(tmp_path, char_vocab_file):
    path, _, vocab_size = char_vocab_file
    tokenizer = gpt2_style_tokenizer(tmp_path / "tok", make_docs(20))
    cfg = make_cfg("tokens", [path], tokenizer=TokenizerConfig(kind="pretrained", path=str(tokenizer)))
    out = prepare_training_data(cfg, tmp_path / "root", 0)
    given = load_tokenizer(tokenizer)
    assert open_tokenizer(out).get_vocab() == given.get_vocab()
    vocab = read_vocabulary(out)
    assert vocab.size == max(vocab_size, len(given)) and vocab.eos_id == given.eos_token_id
    assert read_meta(out)["tokenizer_sha256"]


@pytest.mark.slow
def test_train_export_and_generate_on_a_token_file_without_tokenizer(tmp_path, char_vocab_file):
    """The whole path a nanoGPT-style user takes: train on a char-vocab .bin, export, then generate says why not."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    path, _, vocab_size = char_vocab_file
    np.tile(np.fromfile(path, dtype=np.uint16), 4).tofile(path)  # enough blocks for 2 workers' batches
    common = [f"paths.root={tmp_path}/home"]
    cli = [sys.executable, "-m", "orchestrator.cli"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}

    def lmforge(*args):
        return subprocess.run(cli + list(args), capture_output=True, text=True, env=env, timeout=500,
                              cwd=Path(__file__).resolve().parent.parent)

    trained = lmforge("train", "experiment=smoke", "data=tokens", f"data.paths=[{path}]", "trainer.max_steps=3",
                      "trainer.eval_every=3", "checkpoint.every=3", "run_name=chars", *common)
    assert trained.returncode == 0, trained.stderr[-3000:]
    run_dir = next(line.split()[-1] for line in trained.stdout.splitlines() if line.startswith("checkpoints:"))
    exported = lmforge("export", run_dir, *common, "--out", str(tmp_path / "hf"))
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert (tmp_path / "hf" / "model.safetensors").is_file() and not (tmp_path / "hf" / "tokenizer.json").exists()
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["vocab_size"] >= vocab_size
    generated = lmforge("generate", run_dir, "hi", *common)
    assert generated.returncode == 2 and "no tokenizer" in generated.stderr and "Traceback" not in generated.stderr
