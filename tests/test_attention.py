"""lmforge attention's plots: every layer and the heads of one, readable PNGs of the model's real attention."""

import numpy as np
import pytest
import torch

from common.errors import LmforgeError
from data.config import TokenizerConfig
from data.tokenizer import train_tokenizer
from model.build import build_model
from model.config import ModelConfig
from orchestrator.attention import DPI, attention_maps, attention_weights, encode, figure_layout

CORPUS = ["the quick brown fox jumps over the lazy dog", "players were playing in the international café",
          "a dog and a fox played together all day long"] * 10
TEXT = "the players were playing with a fox in the café"
SETUPS = {"bert": ("masked_lm", "wordpiece", ("cls", "sep")), "gpt2": ("causal_lm", "byte_bpe", ("eos",)),
          "t5": ("seq2seq_lm", "byte_bpe", ("eos",))}


def tiny(arch: str):
    head, kind, roles = SETUPS[arch]
    tok = train_tokenizer(CORPUS, TokenizerConfig(kind=kind, vocab_size=400), roles=roles)
    model = build_model(ModelConfig(arch=arch, n_layer=2, n_head=2, n_embd=32, max_seq_len=64), len(tok), 0, head,
                        eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)
    # A freshly initialised model attends almost uniformly (a flat, one-colour heatmap); larger weights give
    # it the uneven attention of a trained one, so a blank or constant plot cannot pass for a good one.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for parameter in model.parameters():
            torch.nn.init.normal_(parameter, std=0.5)
    return model, tok


def read_png(path):
    from matplotlib.image import imread

    return (imread(path)[..., :3] * 255).round().astype(np.uint8)


def heatmap_colours(pixels, layout) -> int:
    """Distinct viridis colours left of the colorbar (which shows every colour whatever the data); Agg's
    image resampling moves a colour by a unit or two, so a pixel counts as the palette entry within 3."""
    from matplotlib import colormaps

    lut = (colormaps["viridis"](np.arange(256))[:, :3] * 255).round().astype(int)
    heatmaps = pixels[:, : int(pixels.shape[1] * layout.colorbar()[0])]
    left = np.unique(heatmaps.reshape(-1, 3), axis=0).astype(int)
    distance = np.abs(left[:, None, :] - lut[None]).sum(-1)
    return len(set(distance.argmin(1)[distance.min(1) <= 3]))


@pytest.mark.parametrize("arch", ["bert", "gpt2", "t5"])
def test_attention_maps_write_one_readable_image_per_layer_and_the_heads_of_the_last(arch, tmp_path):
    model, tok = tiny(arch)
    before = model.config._attn_implementation
    paths = attention_maps(model, tok, TEXT, tmp_path / "att")

    assert [p.name for p in paths] == ["layer-0.png", "layer-1.png", "layer-1-heads.png"]
    assert model.config._attn_implementation == before  # SDPA (bert, gpt2) comes back after the plots
    tokens, weights = attention_weights(model, tok, TEXT)
    for path, panels in zip(paths, [1, 1, 2], strict=True):
        pixels = read_png(path)
        layout = figure_layout(len(tokens), panels)
        assert pixels.shape[:2] == (round(layout.height * DPI), round(layout.width * DPI)), path.name
        assert pixels.std() > 20, f"{path.name} is blank"
        assert heatmap_colours(pixels, layout) > 30, f"{path.name}'s heatmap is nearly one colour"


def test_figures_grow_with_the_tokens_and_stay_bounded_for_many_heads():
    short, long = figure_layout(10), figure_layout(64)
    assert long.side >= 64 * 0.16 > short.side and long.width > short.width and long.height > short.height
    two_heads, sixteen = figure_layout(64, 2), figure_layout(64, 16)
    assert (two_heads.rows, two_heads.cols, sixteen.rows, sixteen.cols) == (1, 2, 4, 4)
    assert two_heads.side == long.side and sixteen.width <= 48.25 and sixteen.height <= 48.25
    for layout in (short, long, two_heads, sixteen):
        assert (layout.width * DPI).is_integer() and (layout.height * DPI).is_integer()


@pytest.mark.parametrize("arch", ["bert", "gpt2", "t5"])
def test_attention_weights_are_probabilities_over_the_models_own_tokens(arch):
    model, tok = tiny(arch)
    tokens, weights = attention_weights(model, tok, TEXT)

    assert weights.shape == (2, 2, len(tokens), len(tokens))
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 2, len(tokens)))
    text_ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    if arch == "bert":
        assert len(tokens) == len(text_ids) + 2 and tokens[0] == tok.cls_token and tokens[-1] == tok.sep_token
    elif arch == "gpt2":
        assert len(tokens) == len(text_ids)
        # A causal model never attends to later tokens.
        assert torch.equal(weights.triu(1), torch.zeros_like(weights))
    else:
        assert len(tokens) == len(text_ids) + 1 and tokens[-1] == tok.eos_token
    assert all(label and not label.startswith(("Ġ", "##")) for label in tokens)


def test_labels_strip_byte_level_and_wordpiece_marks():
    model, bpe = tiny("gpt2")
    raw = bpe.convert_ids_to_tokens(bpe("the café", add_special_tokens=False)["input_ids"])
    labels, _ = attention_weights(model, bpe, "the café")
    assert raw == ["the", "ĠcafÃ©"] and labels == ["the", "café"]
    model, wordpiece = tiny("bert")
    raw = wordpiece.convert_ids_to_tokens(wordpiece("overplayed", add_special_tokens=False)["input_ids"])
    labels, _ = attention_weights(model, wordpiece, "overplayed")
    assert raw == ["over", "##p", "##l", "##ay", "##ed"] and labels[1:-1] == ["over", "p", "l", "ay", "ed"]


def test_long_text_is_cut_to_max_tokens_and_the_titles_say_so(tmp_path):
    model, tok = tiny("bert")
    long_text = " ".join([TEXT] * 5)
    tokens, weights = attention_weights(model, tok, long_text, max_tokens=10)
    assert len(tokens) == 10 and weights.shape[-1] == 10 and tokens[-1] == tok.sep_token
    total = len(tok(long_text, add_special_tokens=False)["input_ids"])
    assert encode(model, tok, long_text, 10).note == f"first 8 of {total} text tokens"
    assert encode(model, tok, TEXT, 64).note == ""
    # Never past the model's position table, whatever max_tokens asks.
    assert len(attention_weights(model, tok, " ".join([TEXT] * 20), max_tokens=1000)[0]) == 64


def test_layer_out_of_range_names_the_valid_layers(tmp_path):
    model, tok = tiny("gpt2")
    with pytest.raises(LmforgeError, match=r"^--layer 7 is out of range: the model has 2 layers \(0-1\)$"):
        attention_maps(model, tok, TEXT, tmp_path, layer=7)
    with pytest.raises(LmforgeError, match="out of range"):
        attention_maps(model, tok, TEXT, tmp_path, layer=-1)
    assert [p.name for p in attention_maps(model, tok, TEXT, tmp_path, layer=0)][-1] == "layer-0-heads.png"


def test_attention_implementation_and_mode_come_back_when_the_forward_fails():
    model, tok = tiny("gpt2")
    model.train()

    def broken(*args, **kwargs):
        assert model.config._attn_implementation == "eager"
        raise RuntimeError("out of memory")

    model.forward = broken
    with pytest.raises(RuntimeError, match="out of memory"):
        attention_weights(model, tok, TEXT)
    assert model.config._attn_implementation == "sdpa" and model.training
