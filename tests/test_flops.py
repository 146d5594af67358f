"""The MFU formula counts 6N matmul FLOPs plus attention, against hand-computed numbers; MFU is shown only
against a peak the hardware config names. step_flops matches a hand count of every matrix for each family,
and torch's FLOP counter on a real forward+backward of each HF model it describes."""

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.flop_counter import FlopCounterMode
from transformers import (
    BertConfig,
    BertForMaskedLM,
    BertForPreTraining,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

from model.build import build_model
from model.config import ModelConfig
from model.flops import flops_per_token, matmul_params, mfu, mfu_of, step_flops
from model.gpt import padded_vocab_size
from orchestrator.cli import speed_summary
from orchestrator.config import load_config
from orchestrator.metrics import StepMeter
from orchestrator.progress import postfix

CONF = Path(__file__).resolve().parents[1] / "conf"


def test_gpt2_124m_flops_per_token_matches_hand_count():
    cfg = ModelConfig(name="gpt2-124m", n_layer=12, n_head=12, n_embd=768, max_seq_len=1024)
    n = 124_475_904  # GPT-2 small with a 50304-token vocab, tied head, including 1024x768 positions
    expected = 6 * (n - 1024 * 768) + 12 * 12 * 768 * 1024
    assert flops_per_token(n, cfg, 1024) == expected
    assert flops_per_token(n, cfg, 1024) == 855_383_040  # 742,136,832 dense + 113,246,208 attention


def test_position_table_excluded_only_for_learned_positions():
    gpt = ModelConfig(arch="gpt2", max_seq_len=128, n_embd=64)
    llama = ModelConfig(arch="llama", max_seq_len=128, n_embd=64)
    assert matmul_params(10_000, gpt) == 10_000 - 128 * 64
    assert matmul_params(10_000, llama) == 10_000


def test_mfu_is_achieved_over_peak():
    cfg = ModelConfig(arch="llama", n_layer=2, n_embd=64, max_seq_len=128)
    per_token = flops_per_token(1_000_000, cfg, 128)
    assert mfu(1000.0, 1_000_000, cfg, 128, per_token * 1000.0, 1) == pytest.approx(1.0)
    assert mfu(1000.0, 1_000_000, cfg, 128, per_token * 1000.0, 4) == pytest.approx(0.25)


def test_cpu_hardware_names_no_peak_and_gpu_presets_keep_theirs():
    assert load_config([]).hardware.peak_flops_per_worker is None
    assert load_config(["hardware=cpu"]).hardware.peak_flops_per_worker is None
    for preset in ("gpu-1", "gpu-8"):
        assert load_config([f"hardware={preset}"]).hardware.peak_flops_per_worker == 989.0e12
    assert OmegaConf.load(CONF / "hardware" / "multinode-zero3.yaml").peak_flops_per_worker == 989.0e12
    assert load_config(["hardware.peak_flops_per_worker=2e11"]).hardware.peak_flops_per_worker == 2e11


def window(peak: float | None) -> dict:
    cfg = ModelConfig(arch="llama", n_layer=2, n_embd=64, max_seq_len=128)
    meter = StepMeter(cfg, vocab_rows=512, head="causal_lm", peak_flops_per_worker=peak, world_size=2)
    meter.start()
    batch = {"input_ids": torch.zeros(8, 128, dtype=torch.long)}
    meter.count(batch, (8 * 128 - 100, 0))
    meter.stop()
    return {f"train/{k}": v for k, v in meter.read().items()}


def test_meter_counts_real_tokens_and_the_flops_of_the_padded_batch():
    """Throughput counts tokens that are not padding; MFU counts the work done, padding included."""
    cfg = ModelConfig(arch="llama", n_layer=2, n_embd=64, max_seq_len=128)
    meter = StepMeter(cfg, vocab_rows=512, head="causal_lm", peak_flops_per_worker=1.0, world_size=1)
    meter.start()
    meter.count({"input_ids": torch.zeros(8, 128, dtype=torch.long)}, (1000, 0))
    meter.stop()
    busy = meter.busy_s
    read = meter.read()
    assert read["tokens_per_second"] == pytest.approx(1000 / busy)
    assert read["mfu"] == pytest.approx(step_flops(cfg, 512, "causal_lm", 1000, 128) / busy)


def test_without_a_peak_no_mfu_is_logged_and_the_console_says_n_a():
    metrics = window(peak=None) | {"train/loss": 4.1}
    assert "train/mfu" not in metrics and metrics["train/tokens_per_second"] > 0
    assert postfix(metrics).endswith("mfu n/a")
    assert speed_summary(metrics).endswith("MFU n/a (last logged window)")


def test_with_a_peak_mfu_is_logged_and_shown():
    metrics = window(peak=1e12)
    assert metrics["train/mfu"] > 0
    assert f"mfu {metrics['train/mfu']:.1%}" in postfix(metrics)
    assert f"MFU {metrics['train/mfu']:.1%} (last" in speed_summary(metrics)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_built_model_is_seeded_and_padded(arch):
    cfg = ModelConfig(arch=arch, n_layer=1, n_head=2, n_embd=32, max_seq_len=16,
                      n_kv_head=1 if arch == "llama" else None)
    a, b = build_model(cfg, 500, seed=3), build_model(cfg, 500, seed=3)
    c = build_model(cfg, 500, seed=4)
    assert a.config.vocab_size == padded_vocab_size(cfg, 500) == 512
    wa, wb, wc = (next(m.parameters()) for m in (a, b, c))
    assert (wa == wb).all() and not (wa == wc).all()


# Every hand count below: a tiny model of width 8 and 2 heads, a 64-row vocabulary, 2 sequences of 16 tokens.
# Multiply-adds per token are written per matrix; the step is tokens * per_token * 2 FLOPs * 3 (fwd + bwd).


def test_gpt2_step_flops_match_hand_count():
    cfg = ModelConfig(arch="gpt2", n_layer=2, n_head=2, n_embd=8, intermediate_size=32, max_seq_len=16)
    qkv = 8 * 24  # c_attn projects d to Q, K and V at once
    attention_out = 8 * 8
    mlp_up, mlp_down = 8 * 32, 32 * 8
    scores, values = 16 * 8, 16 * 8  # each query against 16 keys, then 16 value rows, over all heads
    lm_head = 8 * 64
    per_token = 2 * (qkv + attention_out + mlp_up + mlp_down + scores + values) + lm_head
    assert per_token == 2560
    assert step_flops(cfg, 64, "causal_lm", tokens=32, seq_len=16) == 32 * per_token * 2 * 3 == 491_520


def test_llama_step_flops_match_hand_count_with_grouped_kv_and_default_swiglu_width():
    cfg = ModelConfig(arch="llama", n_layer=2, n_head=4, n_kv_head=2, n_embd=8, max_seq_len=16)
    q, o = 8 * 8, 8 * 8
    k, v = 8 * 4, 8 * 4  # 2 KV heads of head_dim 8 / 4 = 2
    gate, up, down = 8 * 256, 8 * 256, 256 * 8  # default width: 256 * ceil(int(8 * 8 / 3) / 256)
    scores, values = 16 * 8, 16 * 8  # KV heads are repeated to all 4 query heads before the products
    lm_head = 8 * 64
    per_token = 2 * (q + k + v + o + gate + up + down + scores + values) + lm_head
    assert step_flops(cfg, 64, "causal_lm", tokens=32, seq_len=16) == 32 * per_token * 2 * 3


def test_bert_step_flops_match_hand_count_for_each_head():
    cfg = ModelConfig(arch="bert", n_layer=2, n_head=2, n_embd=8, intermediate_size=32, max_seq_len=16)
    q, k, v, attention_out = 8 * 8, 8 * 8, 8 * 8, 8 * 8
    intermediate, output = 8 * 32, 32 * 8
    scores, values = 16 * 8, 16 * 8
    encoder = 2 * (q + k + v + attention_out + intermediate + output + scores + values)
    mlm_transform, mlm_decoder = 8 * 8, 8 * 64  # the MLM head runs on every position, as HF computes it
    pooler, next_sentence = 8 * 8, 8 * 2  # once per sequence, on its [CLS] token
    sequences = 2
    assert step_flops(cfg, 64, "encoder", tokens=32, seq_len=16) == 32 * encoder * 2 * 3
    assert step_flops(cfg, 64, "masked_lm", tokens=32, seq_len=16) == (
        32 * (encoder + mlm_transform + mlm_decoder) * 2 * 3)
    assert step_flops(cfg, 64, "pretraining", tokens=32, seq_len=16) == (
        (32 * (encoder + mlm_transform + mlm_decoder) + sequences * (pooler + next_sentence)) * 2 * 3)


def test_t5_step_flops_match_hand_count_with_cross_attention_split_between_encoder_and_decoder():
    cfg = ModelConfig(arch="t5", n_layer=2, n_decoder_layer=3, n_head=2, n_embd=8, intermediate_size=32,
                      max_seq_len=16)
    # Encoder tokens (2 x 16): 2 encoder layers, and each of the 3 decoder layers projects their output to
    # cross-attention keys and values.
    q, k, v, o = 8 * 8, 8 * 8, 8 * 8, 8 * 8
    wi, wo = 8 * 32, 32 * 8
    encoder_scores, encoder_values = 16 * 8, 16 * 8
    encoder_layer = q + k + v + o + wi + wo + encoder_scores + encoder_values
    cross_k, cross_v = 8 * 8, 8 * 8
    per_encoder_token = 2 * encoder_layer + 3 * (cross_k + cross_v)
    # Target tokens (2 x 8): 3 decoder layers and the LM head.
    self_scores, self_values = 8 * 8, 8 * 8  # against the 8 target positions
    cross_q, cross_o = 8 * 8, 8 * 8
    cross_scores, cross_values = 16 * 8, 16 * 8  # against the 16 encoder positions
    decoder_layer = (q + k + v + o + self_scores + self_values + cross_q + cross_o + cross_scores
                     + cross_values + wi + wo)
    lm_head = 8 * 64
    per_decoder_token = 3 * decoder_layer + lm_head
    assert step_flops(cfg, 64, "seq2seq_lm", tokens=32, seq_len=16, decoder_tokens=16, decoder_seq_len=8) == (
        (32 * per_encoder_token + 16 * per_decoder_token) * 2 * 3)
    # A T5 sentence encoder runs the encoder stack alone: no cross-attention projections, no decoder.
    assert step_flops(cfg, 64, "encoder", tokens=32, seq_len=16) == 32 * 2 * encoder_layer * 2 * 3


@pytest.mark.parametrize(("arch", "head"), [
    ("gpt2", "masked_lm"), ("llama", "seq2seq_lm"), ("bert", "causal_lm"), ("bert", "seq2seq_lm"),
    ("t5", "causal_lm"), ("t5", "pretraining"), ("gpt2", "classifier"),
])
def test_a_head_the_family_lacks_is_refused_by_name(arch, head):
    with pytest.raises(ValueError, match=f"head '{head}' does not fit model.arch={arch}"):
        step_flops(ModelConfig(arch=arch), 64, head, tokens=32, seq_len=16)


def test_decoder_lengths_go_with_seq2seq_only():
    with pytest.raises(ValueError, match="seq2seq_lm' with 16 decoder tokens needs their decoder_seq_len"):
        step_flops(ModelConfig(arch="t5"), 64, "seq2seq_lm", tokens=32, seq_len=16, decoder_tokens=16)
    with pytest.raises(ValueError, match="'causal_lm' has no decoder stack"):
        step_flops(ModelConfig(arch="gpt2"), 64, "causal_lm", tokens=32, seq_len=16, decoder_tokens=16,
                   decoder_seq_len=8)


def test_mfu_of_divides_by_the_peak_of_every_worker():
    assert mfu_of(2e12, 1e12, 4) == pytest.approx(0.5)


VOCAB, BATCH, SEQ, TARGET_SEQ = 64, 2, 16, 8
# With this transformers every model here agrees with FlopCounterMode exactly. The slack is for versions the
# project also allows (transformers >= 4.50) whose Llama builds its RoPE cos/sin table with a small matmul
# (head_dim / 2 multiply-adds per position, forward only), which step_flops leaves out like all of RoPE.
# It is tight enough to catch a missing matrix: BERT's pooler and NSP head are 0.2% of these steps.
TOLERANCE = 1e-3


def gpt2_case(ids):
    cfg = ModelConfig(arch="gpt2", n_layer=2, n_head=2, n_embd=8, intermediate_size=32, max_seq_len=SEQ)
    model = GPT2LMHeadModel(GPT2Config(
        vocab_size=VOCAB, n_positions=SEQ, n_embd=cfg.n_embd, n_layer=cfg.n_layer, n_head=cfg.n_head,
        n_inner=cfg.intermediate_size, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
        eos_token_id=0, attn_implementation="eager"))
    return cfg, "causal_lm", model, {"input_ids": ids, "labels": ids}, {}


def llama_case(ids):
    cfg = ModelConfig(arch="llama", n_layer=2, n_head=4, n_kv_head=2, n_embd=8, intermediate_size=24,
                      max_seq_len=SEQ)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=cfg.n_embd, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_head,
        max_position_embeddings=SEQ, attention_dropout=0.0, attn_implementation="eager"))
    return cfg, "causal_lm", model, {"input_ids": ids, "labels": ids}, {}


def bert_config(cfg: ModelConfig) -> BertConfig:
    return BertConfig(vocab_size=VOCAB, hidden_size=cfg.n_embd, num_hidden_layers=cfg.n_layer,
                      num_attention_heads=cfg.n_head, intermediate_size=cfg.intermediate_size,
                      max_position_embeddings=SEQ, type_vocab_size=cfg.type_vocab_size,
                      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, attn_implementation="eager")


BERT = ModelConfig(arch="bert", n_layer=2, n_head=2, n_embd=8, intermediate_size=32, max_seq_len=SEQ)


def bert_masked_lm_case(ids):
    return BERT, "masked_lm", BertForMaskedLM(bert_config(BERT)), {"input_ids": ids, "labels": ids}, {}


def bert_pretraining_case(ids):
    batch = {"input_ids": ids, "labels": ids, "next_sentence_label": torch.arange(BATCH) % 2}
    return BERT, "pretraining", BertForPreTraining(bert_config(BERT)), batch, {}


def bert_encoder_case(ids):
    # The sentence encoder mean-pools the last hidden states; BERT's pooler dense is not part of it.
    return BERT, "encoder", BertModel(bert_config(BERT), add_pooling_layer=False), {"input_ids": ids}, {}


def t5_case(ids):
    cfg = ModelConfig(arch="t5", n_layer=2, n_decoder_layer=3, n_head=2, n_embd=8, intermediate_size=32,
                      max_seq_len=SEQ)
    model = T5ForConditionalGeneration(T5Config(
        vocab_size=VOCAB, d_model=cfg.n_embd, d_kv=cfg.n_embd // cfg.n_head, d_ff=cfg.intermediate_size,
        num_layers=cfg.n_layer, num_decoder_layers=cfg.decoder_layers, num_heads=cfg.n_head,
        feed_forward_proj="relu", dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0,
        attn_implementation="eager"))
    targets = torch.randint(1, VOCAB, (BATCH, TARGET_SEQ))
    decoder = {"decoder_tokens": BATCH * TARGET_SEQ, "decoder_seq_len": TARGET_SEQ}
    return cfg, "seq2seq_lm", model, {"input_ids": ids, "labels": targets}, decoder


def training_loss(output) -> torch.Tensor:
    # Models given labels return their training loss; the sentence encoder's is a stand-in on the mean-pooled
    # embedding, which costs no matmul either way.
    if output.get("loss") is not None:
        return output.loss
    return output.last_hidden_state.mean(dim=1).pow(2).sum()


@pytest.mark.parametrize("case", [gpt2_case, llama_case, bert_masked_lm_case, bert_pretraining_case,
                                  bert_encoder_case, t5_case], ids=lambda case: case.__name__)
def test_step_flops_agree_with_torch_flop_counter(case):
    torch.manual_seed(0)
    # Token ids from 1: no padding anywhere, so every position is a real token and no mask skips work.
    ids = torch.randint(1, VOCAB, (BATCH, SEQ))
    cfg, head, model, batch, decoder = case(ids)
    model.train()
    with FlopCounterMode(display=False) as forward:
        loss = training_loss(model(**batch))
    with FlopCounterMode(display=False) as backward:
        loss.backward()
    # The backward pass redoes every matmul twice, for its input's gradient and its weight's, even in the
    # first layer: its input, the embedding output, requires grad because the embedding table trains (the
    # lookup's own backward is a scatter, not a matmul). So 3x forward is what torch counts too.
    assert backward.get_total_flops() == pytest.approx(2 * forward.get_total_flops(), rel=TOLERANCE)
    counted = forward.get_total_flops() + backward.get_total_flops()
    assert step_flops(cfg, VOCAB, head, BATCH * SEQ, SEQ, **decoder) == pytest.approx(counted, rel=TOLERANCE)
