"""Dialogue fine-tuning of a decoder: conversations rendered with a chat template made of the task's own
special tokens, and the loss on the assistant's replies only.

A conversation is a list of {"role": system|user|assistant, "content": text}. Each message becomes
<|role|> content <|end|>, back to back (after the tokenizer's BOS, where it has one of its own), and a reply
is prompted by a bare <|assistant|>. The tokenizer keeps the same layout as its Jinja chat template, so an
exported model answers to transformers' apply_chat_template(..., add_generation_prompt=True).
"""

import json
from collections.abc import Sequence

import numpy as np
import torch

from common.errors import BadRecord, LmforgeError
from model.objectives.base import IGNORE_INDEX, next_token_loss_sums, pad_stack, perplexity_metrics
from model.tasks.base import Task, TaskBuilder, example_field

ROLES = ("system", "user", "assistant")
ROLE_TOKENS = {role: f"<|{role}|>" for role in ROLES}
END = "<|end|>"
CHAT_TOKENS = [*ROLE_TOKENS.values(), END]


def conversation(messages, system_prompt: str = "", reply_needed: bool = True) -> list[dict]:
    """The record's messages, checked, as [{"role", "content"}], with `system_prompt` first when the
    conversation has no system message of its own ("" adds none). A CSV cell holds them as JSON text.
    A training conversation needs an assistant message (`reply_needed`); a prompt to reply to has none."""
    if isinstance(messages, str):
        try:
            messages = json.loads(messages)
        except json.JSONDecodeError as e:
            raise BadRecord(f"messages is text that is not JSON ({e.msg})") from None
    if isinstance(messages, np.ndarray):  # a parquet list column
        messages = messages.tolist()
    if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
        raise BadRecord("messages is empty: a conversation needs at least a user and an assistant message")
    checked = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise BadRecord(f"message {i} is a {type(message).__name__}, not a {{role, content}} object")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise BadRecord(f"message {i} has role {role!r}; roles are {', '.join(ROLES)}")
        if not isinstance(content, str) or not content:
            raise BadRecord(f"message {i} ({role}) has no content")
        checked.append({"role": role, "content": content})
    if reply_needed and not any(m["role"] == "assistant" for m in checked):
        raise BadRecord("the conversation has no assistant message: nothing to learn from")
    if system_prompt and checked[0]["role"] != "system":
        checked.insert(0, {"role": "system", "content": system_prompt})
    return checked


def bos_ids(tokenizer) -> list[int]:
    """The tokenizer's BOS when it has one distinct from EOS (Llama's <s>), as its models always saw it first;
    GPT-2's and lmforge's tokenizers use EOS for both and start with nothing."""
    bos = tokenizer.bos_token_id
    return [bos] if bos is not None and bos != tokenizer.eos_token_id else []


def render(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """(ids, loss mask) of a checked conversation. Each content is tokenized on its own: the special tokens
    around it split a rendered string at the same places, so the ids equal the chat template's, and the mask
    (1 on an assistant's content and its <|end|>, which teaches the model to stop) is exact."""
    ids = bos_ids(tokenizer)
    mask = [0] * len(ids)
    role_ids = dict(zip(ROLES, tokenizer.convert_tokens_to_ids(list(ROLE_TOKENS.values()))))
    end_id = tokenizer.convert_tokens_to_ids(END)
    for message in messages:
        content = tokenizer(message["content"], add_special_tokens=False)["input_ids"]
        learned = int(message["role"] == "assistant")
        ids += [role_ids[message["role"]], *content, end_id]
        mask += [0] + [learned] * (len(content) + 1)
    return ids, mask


def chat_template(tokenizer, system_prompt: str = "") -> str:
    """The Jinja template of `render`'s layout, with `system_prompt` as its default system message. The
    prompt goes in as a JSON string, which Jinja reads as the same string literal."""
    default = (f"{{%- if messages[0]['role'] != 'system' -%}}{ROLE_TOKENS['system']}"
               f"{{{{ {json.dumps(system_prompt, ensure_ascii=False)} }}}}{END}{{%- endif -%}}"
               if system_prompt else "")
    return ("{{- bos_token -}}" if bos_ids(tokenizer) else "") + default + (
        "{%- for message in messages -%}<|{{ message['role'] }}|>{{ message['content'] }}" + END +
        "{%- endfor -%}{%- if add_generation_prompt -%}" + ROLE_TOKENS["assistant"] + "{%- endif -%}")


class DialogueBuilder(TaskBuilder):
    fields = {"input_ids": "ids", "loss_mask": "int8", "example_id": "int64"}

    def texts(self, record: dict) -> list[str]:
        # Tokenizer training reads records before any is checked: a bad one is reported later, by samples(),
        # where the reader knows its file and line (or skips it under data.lenient).
        try:
            return [m["content"] for m in conversation(record.get("messages"), reply_needed=False)]
        except BadRecord:
            return []

    def samples(self, record: dict, example_id: int) -> list[dict[str, np.ndarray]]:
        """One sample per conversation. A conversation longer than seq_len keeps its first seq_len tokens:
        the context each kept reply was written in stays whole, and only the end is lost. One whose first
        reply starts past seq_len has nothing left to learn and is a BadRecord."""
        ids, mask = render(self.tokenizer, conversation(record.get("messages"), self.cfg.system_prompt))
        ids, mask = ids[: self.seq_len], mask[: self.seq_len]
        if not any(mask):
            raise BadRecord(f"the first assistant reply starts after data.seq_len={self.seq_len} tokens; "
                            "raise data.seq_len or shorten the conversation")
        return [{"input_ids": np.asarray(ids, dtype=np.int64), "loss_mask": np.asarray(mask, dtype=np.int8),
                 "example_id": example_field(example_id)}]

    def reference(self, record: dict) -> str:
        return [m for m in conversation(record.get("messages")) if m["role"] == "assistant"][-1]["content"]


class Dialogue(Task):
    name, head, families = "dialogue", "causal_lm", ("decoder",)
    roles = required_roles = ("messages",)
    tokenizer_roles = ("eos",)
    builder_class = DialogueBuilder
    selection_metric, selection_mode = "val/loss", "min"

    @staticmethod
    def prepare_tokenizer(cfg, tokenizer):
        """Add the role and end tokens (the model's embedding grows to hold them) and the chat template. A
        published tokenizer's own template is replaced: the model is trained on this layout."""
        missing = [t for t in CHAT_TOKENS if t not in tokenizer.get_vocab()]
        if missing:
            tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
        tokenizer.chat_template = chat_template(tokenizer, cfg.system_prompt)
        return tokenizer

    def collate(self, samples: Sequence[dict], train: bool = True) -> dict[str, torch.Tensor]:
        """Right-pad by length (see CausalLM.collate: the fill is the pad id, else 0, and never marks
        padding); only the assistant's tokens are labelled."""
        pad = self.vocab.pad_id if self.vocab.pad_id is not None else 0
        input_ids, real = pad_stack([s["input_ids"] for s in samples], pad)
        learned, _ = pad_stack([s["loss_mask"] for s in samples], 0)
        # HF causal LMs shift labels inside forward(): the mask sits on the tokens to be predicted.
        labels = input_ids.masked_fill(~(learned.bool() & real), IGNORE_INDEX)
        return {"input_ids": input_ids, "attention_mask": real.long(), "labels": labels}

    def eval_sums(self, model, batch):
        return next_token_loss_sums(model, batch)

    def metrics(self, sums):
        """Loss and perplexity of the assistant's replies (and their end token), given the conversation."""
        return perplexity_metrics(sums)

    def predict(self, model, batch, samples):
        # Nothing to generate: the validation perplexity of the replies (eval_sums) is the metric.
        return [{"example_id": int(np.asarray(s["example_id"]).reshape(-1)[0])} for s in samples]

    def score(self, predictions, references):
        return {}

    def baseline(self, references):
        """Nothing: no trivial reply has a perplexity to compare with. Dialogue's baseline is the untrained
        decoder's reply perplexity, which the training run's test measures."""
        return {}

    def infer(self, model, tokenizer, text, context=None):
        """The assistant's reply to one user message (after the system prompt, if configured): greedy, up to
        objective.max_new_tokens or the model's positions, stopping at <|end|>."""
        if not text:
            raise LmforgeError("the message is empty: there is nothing to reply to")
        messages = conversation([{"role": "user", "content": text}], self.cfg.system_prompt, reply_needed=False)
        ids, _ = render(tokenizer, messages)
        ids.append(tokenizer.convert_tokens_to_ids(ROLE_TOKENS["assistant"]))
        model = getattr(model, "module", model)
        limit = getattr(model.config, "max_position_embeddings", None)
        room = self.cfg.max_new_tokens if limit is None else min(self.cfg.max_new_tokens, limit - len(ids))
        if room < 1:
            raise LmforgeError(f"the message is {len(ids)} tokens with the chat template; "
                               f"the model reads at most {limit}")
        end_id = tokenizer.convert_tokens_to_ids(END)
        prompt = torch.tensor([ids], device=next(model.parameters()).device)
        with torch.no_grad():
            out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                 max_new_tokens=room, eos_token_id=end_id,
                                 pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                                 else end_id)
        reply = out[0, len(ids):].tolist()
        if end_id in reply:
            reply = reply[: reply.index(end_id)]
        return {"reply": tokenizer.decode(reply, skip_special_tokens=True)}

    def show(self, result):
        return result["reply"]
