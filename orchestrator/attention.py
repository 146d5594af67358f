"""Self-attention heatmaps of a model over one text: what `lmforge attention` writes.

Files: `layer-<i>.png` per layer (the mean over heads), so every token label stays legible at full size
whatever the model's depth (a 12-layer x 64-token grid in one image has to be zoomed to read any label), and
`layer-<L>-heads.png`, the heads of one layer side by side on one colour scale, because heads are read by
comparing them with each other. Layer numbers are zero-padded so the files sort in layer order.
"""

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from common.errors import LmforgeError

DPI = 100
TOKEN_INCHES = 0.16  # per token on a heatmap's side: room for one 7-point tick label
MIN_PANEL_INCHES = 2.5  # a short text's heatmap still holds its title
LABEL_CHARS = 14  # longer token labels are shortened with an ellipsis, so the margins below hold them
LEFT_INCHES = 1.4  # the query tokens and the axis title
BOTTOM_INCHES = 1.4  # the key tokens, rotated, and the axis title
TOP_INCHES = 0.9  # the figure title and the heatmaps' titles
RIGHT_INCHES = 1.4  # the colorbar, its ticks and its label
GAP_INCHES = 0.45  # between heatmaps of a grid: the title of the one below
MAX_FIGURE_INCHES = 48.0  # a 16-head grid over 64 tokens stays under ~5000 px a side
# Models that see a text left to right, as generated text: no [CLS]/[SEP] around it.
CAUSAL_TYPES = ("gpt2", "llama")


@dataclass
class Encoded:
    ids: list[int]
    tokens: list[str]  # the tokenizer's own tokens, special ones included
    text_tokens: int  # the text's tokens before cutting to max_tokens
    kept: int  # the text's tokens kept

    @property
    def note(self) -> str:
        """What the figure titles say when the text was cut."""
        return f"first {self.kept} of {self.text_tokens} text tokens" if self.kept < self.text_tokens else ""


def is_causal(model) -> bool:
    return model.config.model_type in CAUSAL_TYPES or bool(getattr(model.config, "is_decoder", False))


def position_limit(model) -> int | None:
    """The longest input the model's position table holds; None for relative positions (T5)."""
    return getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)


def encode(model, tokenizer, text: str, max_tokens: int = 64) -> Encoded:
    """The ids the model sees for `text`, as it saw text in training: an encoder's text between [CLS] and
    [SEP] when the tokenizer has them, T5's encoder text ending in EOS, a decoder's text bare. Tokenizing
    without the tokenizer's own special tokens and adding them here serves trained tokenizers (which have
    no post-processor) and published ones alike."""
    text_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not text_ids:
        raise LmforgeError(f"the text {text!r} has no tokens to plot attention over")
    if is_causal(model):
        before, after = [], []
    elif model.config.model_type == "t5":
        before, after = [], [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    else:
        before = [tokenizer.cls_token_id] if tokenizer.cls_token_id is not None else []
        after = [tokenizer.sep_token_id] if tokenizer.sep_token_id is not None else []
    limit = min(max_tokens, position_limit(model) or max_tokens)
    room = limit - len(before) - len(after)
    if room < 1:
        raise LmforgeError(f"max_tokens={max_tokens} leaves no room for text after the model's "
                           f"{len(before) + len(after)} special tokens")
    ids = before + text_ids[:room] + after
    return Encoded(ids, tokenizer.convert_ids_to_tokens(ids), len(text_ids), min(room, len(text_ids)))


def token_label(tokenizer, token: str) -> str:
    """A token as readable text: byte-level bytes decoded ('Ġthe' -> 'the', 'Ã©' -> 'é'), wordpiece's
    continuation mark dropped ('##ing' -> 'ing'), whitespace-only tokens shown as a visible mark."""
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    if token in tokenizer.all_special_tokens or decoder is None:
        text = token
    else:
        text = decoder.decode([token])
        if "\ufffd" in text:  # part of a multi-byte character: the raw token says more than a box
            text = token
    text = text.removeprefix("##")
    if text.strip():
        return text.strip()
    return "\\n" if "\n" in text else "␣"


def forward_attention(model, ids: list[int]) -> torch.Tensor:
    """[layers, heads, T, T] self-attention probabilities of `model` over `ids` (T5: its encoder's).

    SDPA never materialises the probabilities, so the model runs with eager attention for this call only;
    its attention implementation and train/eval mode are restored afterwards, even when the forward fails.
    """
    previous, training = model.config._attn_implementation, model.training
    switch = getattr(model, "set_attn_implementation", None)
    try:
        if switch is not None:
            switch("eager")
        else:
            model.config._attn_implementation = "eager"
        model.eval()
        device = next(model.parameters()).device
        input_ids = torch.tensor([ids], device=device)
        # T5's decoder is not what is plotted; running only the encoder needs no decoder start token.
        module = model.get_encoder() if model.config.model_type == "t5" and hasattr(model, "get_encoder") else model
        with torch.no_grad():
            out = module(input_ids=input_ids, output_attentions=True)
    finally:
        if switch is not None:
            switch(previous)
        else:
            model.config._attn_implementation = previous
        model.train(training)
    if not out.attentions or out.attentions[0] is None:
        raise LmforgeError(f"{model.config.model_type} returned no attention weights even with eager attention")
    return torch.stack([layer[0] for layer in out.attentions]).float().cpu()


def attention_weights(model, tokenizer, text: str, max_tokens: int = 64) -> tuple[list[str], torch.Tensor]:
    """The tokens of `text` (readable labels, special tokens included) and the model's self-attention over
    them, [layers, heads, T, T]; each row (one query token) is a probability distribution over keys."""
    encoded = encode(model, tokenizer, text, max_tokens)
    return [token_label(tokenizer, t) for t in encoded.tokens], forward_attention(model, encoded.ids)


def grid_shape(n_panels: int) -> tuple[int, int]:
    cols = math.ceil(math.sqrt(n_panels))
    return math.ceil(n_panels / cols), cols


@dataclass
class Layout:
    """Where a figure's heatmaps go, in inches. Laid out by hand rather than by matplotlib's constrained
    layout, which draws every tick label an extra time and made a 12-head grid over 64 tokens 3x slower."""

    rows: int
    cols: int
    side: float  # one heatmap's side
    width: float
    height: float

    def panel(self, index: int) -> list[float]:
        """Axes rectangle of heatmap `index` (row-major), as fractions of the figure."""
        row, col = divmod(index, self.cols)
        x = LEFT_INCHES + col * (self.side + GAP_INCHES)
        y = BOTTOM_INCHES + (self.rows - 1 - row) * (self.side + GAP_INCHES)
        return [x / self.width, y / self.height, self.side / self.width, self.side / self.height]

    def colorbar(self) -> list[float]:
        x = LEFT_INCHES + self.cols * self.side + (self.cols - 1) * GAP_INCHES + 0.25
        grid_height = self.rows * self.side + (self.rows - 1) * GAP_INCHES
        return [x / self.width, BOTTOM_INCHES / self.height, 0.2 / self.width, grid_height / self.height]


def figure_layout(n_tokens: int, n_panels: int = 1) -> Layout:
    """A grid of `n_panels` heatmaps over `n_tokens` tokens, growing with the tokens up to MAX_FIGURE_INCHES.

    The size is rounded up to a quarter inch, which DPI turns into a whole number of pixels exactly (Agg
    truncates a fractional size: 12.29 in could save as 1228 px)."""
    rows, cols = grid_shape(n_panels)
    side = max(MIN_PANEL_INCHES, TOKEN_INCHES * n_tokens)
    side = min(side, (MAX_FIGURE_INCHES - LEFT_INCHES - RIGHT_INCHES - (cols - 1) * GAP_INCHES) / cols)
    width = LEFT_INCHES + cols * side + (cols - 1) * GAP_INCHES + RIGHT_INCHES
    height = TOP_INCHES + rows * side + (rows - 1) * GAP_INCHES + BOTTOM_INCHES
    return Layout(rows, cols, side, math.ceil(width * 4) / 4, math.ceil(height * 4) / 4)


def short(label: str) -> str:
    return label if len(label) <= LABEL_CHARS else label[: LABEL_CHARS - 1] + "…"


def save_figure(matrices: list[torch.Tensor], titles: list[str], labels: list[str], suptitle: str,
                path: Path) -> Path:
    """One image of `matrices` in a grid, sharing one colour scale (0 to their largest weight) and colorbar.
    Tick labels go on the outer heatmaps only: the grid's heatmaps share their tokens."""
    import matplotlib

    matplotlib.use("Agg")  # headless: a server or a CI runner has no display
    import matplotlib.pyplot as plt

    layout = figure_layout(len(labels), len(matrices))
    # Labels shrink with the cells of a grid squeezed to MAX_FIGURE_INCHES, so neighbours never overlap.
    fontsize = min(7.0, 0.85 * 72 * layout.side / len(labels))
    ticks, names = range(len(labels)), [short(label) for label in labels]
    vmax = max(float(m.max()) for m in matrices)
    fig = plt.figure(figsize=(layout.width, layout.height), dpi=DPI)
    try:
        for index, (matrix, title) in enumerate(zip(matrices, titles, strict=True)):
            ax = fig.add_axes(layout.panel(index))
            image = ax.imshow(matrix.numpy(), cmap="viridis", vmin=0.0, vmax=vmax, interpolation="nearest")
            ax.set_title(title, fontsize=9)
            # parse_math=False: a '$' in a token must not switch matplotlib into math mode.
            ax.set_xticks(ticks, names if index + layout.cols >= len(matrices) else [], rotation=90,
                          fontsize=fontsize, parse_math=False)
            ax.set_yticks(ticks, names if index % layout.cols == 0 else [], fontsize=fontsize, parse_math=False)
            if index + layout.cols >= len(matrices):
                ax.set_xlabel("key (attended to)", fontsize=8)
            if index % layout.cols == 0:
                ax.set_ylabel("query (attending)", fontsize=8)
        fig.colorbar(image, cax=fig.add_axes(layout.colorbar()), label="attention weight")
        fig.suptitle(suptitle, fontsize=10, y=1 - 0.2 / layout.height, va="top")
        fig.savefig(path, dpi=DPI)
    finally:
        plt.close(fig)
    return path


def attention_maps(model, tokenizer, text: str, out_dir: Path, layer: int | None = None,
                   max_tokens: int = 64) -> list[Path]:
    """PNG heatmaps of `model`'s self-attention over `text`: `layer-<i>.png` per layer (mean over heads) and
    `layer-<L>-heads.png` with every head of `layer` (default: the last). Returns the written paths."""
    n_layers = model.config.num_hidden_layers
    if layer is None:
        layer = n_layers - 1
    if not 0 <= layer < n_layers:
        raise LmforgeError(f"--layer {layer} is out of range: the model has {n_layers} layers (0-{n_layers - 1})")
    note = encode(model, tokenizer, text, max_tokens).note
    labels, weights = attention_weights(model, tokenizer, text, max_tokens)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = model.config.model_type
    suffix = f" ({note})" if note else ""
    digits = len(str(n_layers - 1))
    paths = []
    for i in range(weights.shape[0]):
        paths.append(save_figure([weights[i].mean(0)], [f"layer {i}: mean of {weights.shape[1]} heads"], labels,
                                 f"{name} self-attention{suffix}", out_dir / f"layer-{i:0{digits}d}.png"))
    heads = weights[layer]
    paths.append(save_figure(list(heads), [f"head {h}" for h in range(heads.shape[0])], labels,
                             f"{name} self-attention, layer {layer}{suffix}",
                             out_dir / f"layer-{layer:0{digits}d}-heads.png"))
    return paths
