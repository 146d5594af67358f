"""Dialogue task: the chat template (ids equal to apply_chat_template's, after a save and reload too), a loss
mask on exactly the assistant's replies, bad conversations, truncation, and a tiny GPT-2 that learns replies."""

import pytest
import torch
from model_helpers import check_loss_and_eval
from task_helpers import eval_metric

from common.errors import BadRecord, LmforgeError
from data.config import TokenizerConfig
from data.prepared import Vocabulary
from data.tokenizer import load_tokenizer, train_tokenizer
from model.build import build_model
from model.config import ModelConfig
from model.objectives.base import IGNORE_INDEX
from model.objectives.config import ObjectiveConfig
from model.tasks.dialogue import CHAT_TOKENS, END, Dialogue, conversation, render

QA = [("What color is the sky?", "The sky is blue."), ("What do cats say?", "Cats say meow."),
      ("How many legs has a dog?", "A dog has four legs."), ("Where is Paris?", "Paris is in France.")]
CONVERSATIONS = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in QA]
MULTI_TURN = [{"role": "system", "content": "You answer in one sentence."},
              {"role": "user", "content": "Hello there"}, {"role": "assistant", "content": " Hi! How can I help?"},
              {"role": "user", "content": "Where is Paris?\n"}, {"role": "assistant", "content": "In France.\n\n"}]
# Quotes, a newline, Jinja's own delimiters and characters beyond ASCII: the template must carry it verbatim.
ODD_PROMPT = 'Be "brief" {{ and }} {% raw %}\n, café 😀 \\n'


def base_tokenizer(kind="byte_bpe"):
    texts = [m["content"] for c in [*CONVERSATIONS, MULTI_TURN] for m in c] * 10
    return train_tokenizer(texts, TokenizerConfig(kind=kind, vocab_size=300, min_frequency=1), roles=("eos",))


@pytest.fixture(scope="module")
def tokenizer():
    return Dialogue.prepare_tokenizer(ObjectiveConfig(name="dialogue"), base_tokenizer())


def task_for(tokenizer, **cfg):
    cfg = ObjectiveConfig(name="dialogue", **cfg)
    vocab = Vocabulary(size=len(tokenizer), bos_id=tokenizer.bos_token_id, eos_id=tokenizer.eos_token_id,
                       pad_id=tokenizer.pad_token_id)
    return Dialogue(cfg, vocab, seed=0, tokenizer=tokenizer), cfg


def samples_of(tokenizer, cfg, conversations, seq_len=64):
    builder = Dialogue.builder(cfg, tokenizer, seq_len)
    return [{**s, "sample_id": i, "epoch": 0} for i, c in enumerate(conversations)
            for s in builder.samples({"messages": c}, i)]


def tiny_gpt2(tokenizer, max_seq_len=128):
    return build_model(ModelConfig(arch="gpt2", n_layer=1, n_head=2, n_embd=32, max_seq_len=max_seq_len),
                       len(tokenizer), 0, head="causal_lm", eos_id=tokenizer.eos_token_id,
                       pad_id=tokenizer.pad_token_id)


def test_prepare_tokenizer_adds_the_chat_tokens_once_as_special_tokens():
    tok = base_tokenizer()
    size, cfg = len(tok), ObjectiveConfig(name="dialogue")
    tok = Dialogue.prepare_tokenizer(cfg, tok)
    assert len(tok) == size + len(CHAT_TOKENS)
    assert set(CHAT_TOKENS) <= set(tok.all_special_tokens)
    ids = tok.convert_tokens_to_ids(CHAT_TOKENS)
    assert Dialogue.prepare_tokenizer(cfg, tok).convert_tokens_to_ids(CHAT_TOKENS) == ids and len(tok) == size + 4
    assert tok.eos_token == "<|endoftext|>", "the tokenizer's own special tokens stay"
    # Whole tokens in any text, never split into pieces.
    encoded = tok("<|user|>hi<|end|>", add_special_tokens=False)["input_ids"]
    assert encoded[0] == ids[1] and encoded[-1] == ids[3]


@pytest.mark.parametrize("kind", ["byte_bpe", "unigram"])  # unigram: SentencePiece-style word-start marks
@pytest.mark.parametrize("system_prompt", ["", ODD_PROMPT])
@pytest.mark.parametrize("distinct_bos", [False, True])  # True: a BOS of its own, like Llama's <s>
def test_rendered_ids_equal_apply_chat_template_also_after_a_reload(tmp_path, kind, system_prompt, distinct_bos):
    tok = base_tokenizer(kind)
    if distinct_bos:
        tok.add_special_tokens({"bos_token": "<s>"})
    tok = Dialogue.prepare_tokenizer(ObjectiveConfig(name="dialogue", system_prompt=system_prompt), tok)
    tok.save_pretrained(str(tmp_path / "tok"))
    reloaded = load_tokenizer(tmp_path / "tok")
    for messages in [*CONVERSATIONS, MULTI_TURN]:
        ids, _ = render(tok, conversation(messages, system_prompt))
        assert ids == reloaded.apply_chat_template(messages, tokenize=True, return_dict=False)
        assert (ids[0] == tok.bos_token_id) == distinct_bos
        prompt = reloaded.apply_chat_template(messages[:-1], tokenize=True, add_generation_prompt=True,
                                              return_dict=False)
        # The generation prompt is the conversation so far and a bare <|assistant|>, as infer builds it.
        assert prompt == render(tok, conversation(messages[:-1], system_prompt, reply_needed=False))[0] + [
            tok.convert_tokens_to_ids("<|assistant|>")]
    text = reloaded.apply_chat_template(CONVERSATIONS[0], tokenize=False)
    expected = "" if not system_prompt else f"<|system|>{system_prompt}<|end|>"
    assert text == ("<s>" if distinct_bos else "") + expected + (
        "<|user|>What color is the sky?<|end|><|assistant|>The sky is blue.<|end|>")


def masked_runs(tokenizer, sample) -> list[str]:
    """Each run of consecutive loss-carrying positions, decoded, and the token just before it."""
    ids, mask = sample["input_ids"].tolist(), sample["loss_mask"].tolist()
    runs, start = [], None
    for i, m in enumerate([*mask, 0]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            runs.append((tokenizer.convert_ids_to_tokens(ids[start - 1]), tokenizer.decode(ids[start:i])))
            start = None
    return runs


def test_loss_mask_covers_exactly_each_assistant_reply_and_its_end_token(tokenizer):
    _, cfg = task_for(tokenizer)
    builder = Dialogue.builder(cfg, tokenizer, 128)
    assert builder.fields == {"input_ids": "ids", "loss_mask": "int8", "example_id": "int64"}
    sample, = builder.samples({"messages": MULTI_TURN}, 3)
    assert sample["loss_mask"].dtype.name == "int8" and sample["example_id"].tolist() == [3]
    assert masked_runs(tokenizer, sample) == [("<|assistant|>", " Hi! How can I help?" + END),
                                              ("<|assistant|>", "In France.\n\n" + END)]
    assert tokenizer.decode(sample["input_ids"]) == "".join(
        f"<|{m['role']}|>{m['content']}{END}" for m in MULTI_TURN)


def test_the_system_prompt_is_used_only_when_a_conversation_has_none(tokenizer):
    _, cfg = task_for(tokenizer, system_prompt="Be kind.")
    builder = Dialogue.builder(cfg, tokenizer, 128)
    plain, = builder.samples({"messages": CONVERSATIONS[0]}, 0)
    assert tokenizer.decode(plain["input_ids"]).startswith("<|system|>Be kind.<|end|><|user|>What color")
    own, = builder.samples({"messages": MULTI_TURN}, 0)
    assert tokenizer.decode(own["input_ids"]).startswith("<|system|>You answer in one sentence.<|end|><|user|>")
    assert "Be kind." not in tokenizer.decode(own["input_ids"])
    none, = Dialogue.builder(task_for(tokenizer)[1], tokenizer, 128).samples({"messages": CONVERSATIONS[0]}, 0)
    assert tokenizer.decode(none["input_ids"]).startswith("<|user|>")
    assert masked_runs(tokenizer, plain) == masked_runs(tokenizer, none), "the system prompt carries no loss"


@pytest.mark.parametrize("messages, problem", [
    ([], "messages is empty"),
    (None, "messages is empty"),
    ([{"role": "user", "content": "Hi"}, {"role": "bot", "content": "Hello"}], "message 1 has role 'bot'"),
    ([{"role": "user"}, {"role": "assistant", "content": "Hello"}], r"message 0 \(user\) has no content"),
    ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ""}], r"message 1 \(assistant\) has no"),
    ([{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"}], "no assistant message"),
    (["Hi", "Hello"], "message 0 is a str"),
    ('[{"role": "user", "content": "Hi"', "not JSON"),
])
def test_unusable_conversations_are_bad_records_naming_the_problem(tokenizer, messages, problem):
    _, cfg = task_for(tokenizer)
    with pytest.raises(BadRecord, match=problem):
        Dialogue.builder(cfg, tokenizer, 64).samples({"messages": messages}, 0)


def test_messages_given_as_json_text_build_the_same_sample(tokenizer):
    import json

    _, cfg = task_for(tokenizer)
    builder = Dialogue.builder(cfg, tokenizer, 128)
    as_text, = builder.samples({"messages": json.dumps(MULTI_TURN)}, 0)
    as_list, = builder.samples({"messages": MULTI_TURN}, 0)
    assert as_text["input_ids"].tolist() == as_list["input_ids"].tolist()


def test_a_long_conversation_keeps_its_first_seq_len_tokens(tokenizer):
    _, cfg = task_for(tokenizer)
    full, = Dialogue.builder(cfg, tokenizer, 128).samples({"messages": MULTI_TURN}, 0)
    cut_at = len(full["input_ids"]) - 6  # inside the last reply
    cut, = Dialogue.builder(cfg, tokenizer, cut_at).samples({"messages": MULTI_TURN}, 0)
    assert cut["input_ids"].tolist() == full["input_ids"][:cut_at].tolist()
    assert cut["loss_mask"].tolist() == full["loss_mask"][:cut_at].tolist()


def test_a_first_reply_beyond_seq_len_is_a_bad_record(tokenizer):
    _, cfg = task_for(tokenizer)
    with pytest.raises(BadRecord, match="first assistant reply starts after data.seq_len=8"):
        Dialogue.builder(cfg, tokenizer, 8).samples({"messages": MULTI_TURN}, 0)


def test_reference_is_the_last_reply_and_texts_need_no_tokenizer(tokenizer):
    _, cfg = task_for(tokenizer)
    assert Dialogue.builder(cfg, tokenizer, 64).reference({"messages": MULTI_TURN}) == "In France.\n\n"
    assert Dialogue.builder(cfg, None, 64).texts({"messages": MULTI_TURN}) == [m["content"] for m in MULTI_TURN]
    # Tokenizer training reads every record before any is checked; a bad one is reported by samples().
    assert Dialogue.builder(cfg, None, 64).texts({"messages": [{"role": "bot", "content": "Hi"}]}) == []


def test_collate_labels_only_the_replies_and_the_loss_is_the_models(tokenizer):
    task, cfg = task_for(tokenizer)
    samples = samples_of(tokenizer, cfg, [CONVERSATIONS[0], MULTI_TURN])
    batch = task.collate(samples, train=True)
    short = len(samples[0]["input_ids"])
    assert batch["input_ids"].shape == (2, len(samples[1]["input_ids"]))
    assert batch["attention_mask"].sum(1).tolist() == [len(s["input_ids"]) for s in samples]
    assert batch["input_ids"][0, short:].eq(tokenizer.pad_token_id).all()
    for row, sample in zip(batch["labels"], samples):
        learned = torch.from_numpy(sample["loss_mask"]).bool()
        n = len(learned)
        assert row[:n][learned].tolist() == sample["input_ids"][learned.numpy()].tolist()
        assert row[:n][~learned].eq(IGNORE_INDEX).all() and row[n:].eq(IGNORE_INDEX).all()
    metrics, sums = check_loss_and_eval(task, tiny_gpt2(tokenizer), batch)
    assert set(metrics) == {"loss", "perplexity"}
    assert sums["tokens"].item() == sum(int(s["loss_mask"].sum()) for s in samples), "reply tokens only"


def test_predict_scores_nothing_and_the_baseline_is_left_to_the_training_run(tokenizer):
    task, cfg = task_for(tokenizer)
    samples = samples_of(tokenizer, cfg, CONVERSATIONS[:2])
    batch = task.collate(samples, train=False)
    predictions = task.predict(tiny_gpt2(tokenizer), batch, samples)
    assert predictions == [{"example_id": 0}, {"example_id": 1}]
    assert task.score(predictions, [a for _, a in QA[:2]]) == {} and task.baseline([a for _, a in QA]) == {}


def test_a_tiny_gpt2_learns_the_replies_and_infer_answers_with_them(tokenizer, one_thread):
    """60 full-batch AdamW steps on four conversations: the replies' perplexity falls below a tenth of the
    untrained model's, and asked each question, the model answers with its reply and stops at <|end|>."""
    task, cfg = task_for(tokenizer, max_new_tokens=20)
    batch = task.collate(samples_of(tokenizer, cfg, CONVERSATIONS), train=True)
    model = tiny_gpt2(tokenizer)

    def perplexity():
        return eval_metric(task, model, batch, "perplexity")

    untrained = perplexity()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(60):
        loss = task.loss(model, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    trained = perplexity()
    assert trained < untrained / 10, (untrained, trained)
    model.eval()
    for question, answer in QA:
        result = task.infer(model, tokenizer, question)
        assert result == {"reply": answer} and task.show(result) == answer


def test_infer_refuses_a_message_longer_than_the_model_reads(tokenizer):
    task, _ = task_for(tokenizer)
    with pytest.raises(LmforgeError, match="the model reads at most 16"):
        task.infer(tiny_gpt2(tokenizer, max_seq_len=16), tokenizer, " ".join(q for q, _ in QA))
    with pytest.raises(LmforgeError, match="empty"):
        task.infer(tiny_gpt2(tokenizer), tokenizer, "")
