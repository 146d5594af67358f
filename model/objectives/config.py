"""Typed schema for the `objective` config group: one flat record, each objective reads its own keys."""

from dataclasses import dataclass

from common.errors import require

POOLINGS = ("mean", "cls")


@dataclass
class ObjectiveConfig:
    name: str = "clm"
    # mlm, mlm_nsp: share of tokens selected for prediction (80% [MASK], 10% random, 10% unchanged)
    mask_prob: float = 0.15
    whole_word_mask: bool = False  # select whole words (all of a word's subword tokens) together
    # mlm_nsp: share of pairs whose second segment comes from another document; short-pair share
    random_next_prob: float = 0.5
    short_seq_prob: float = 0.1
    # span_corruption: share of tokens noised, and the mean length of a noised span
    noise_density: float = 0.15
    mean_span_length: float = 3.0
    # contrastive: InfoNCE temperature, how token states become one vector, and whether negatives come
    # from every rank's batch (null: yes when there is more than one worker)
    temperature: float = 0.05
    pooling: str = "mean"
    gather_negatives: bool | None = None
    # seq_cls: a record may carry several labels (a list), scored per label with a sigmoid
    multi_label: bool = False
    multi_label_threshold: float = 0.5
    # extractive_qa: a long context is cut into windows of data.seq_len that overlap by doc_stride tokens;
    # answers are the best of n_best start and end candidates, at most max_answer_length tokens long
    doc_stride: int = 64
    n_best: int = 20
    max_answer_length: int = 30
    allow_unanswerable: bool = False  # SQuAD 2.0: a question may have no answer in its context
    # seq2seq: targets are cut to max_target_len tokens; evaluation generates with these settings
    max_target_len: int = 64
    num_beams: int = 1
    max_new_tokens: int = 64
    source_prefix: str = ""  # prepended to every source, as T5 was trained ("summarize: ")
    # dialogue: only the assistant's turns carry loss; the system prompt used when a conversation has none
    system_prompt: str = ""

    def validate(self, at: str = "objective") -> None:
        from model.objectives import objective_names

        require(self.name in objective_names(), f"{at}.name", self.name, f"one of {', '.join(objective_names())}")
        require(0.0 < self.mask_prob < 1.0, f"{at}.mask_prob", self.mask_prob, "a float in (0, 1)")
        require(0.0 <= self.random_next_prob <= 1.0, f"{at}.random_next_prob", self.random_next_prob,
                "a float in [0, 1]")
        require(0.0 <= self.short_seq_prob <= 1.0, f"{at}.short_seq_prob", self.short_seq_prob, "a float in [0, 1]")
        require(0.0 < self.noise_density < 1.0, f"{at}.noise_density", self.noise_density, "a float in (0, 1)")
        require(self.mean_span_length >= 1.0, f"{at}.mean_span_length", self.mean_span_length, "a float >= 1")
        require(self.temperature > 0, f"{at}.temperature", self.temperature, "a float > 0")
        require(0.0 < self.multi_label_threshold < 1.0, f"{at}.multi_label_threshold", self.multi_label_threshold,
                "a float in (0, 1)")
        for key in ("doc_stride", "n_best", "max_answer_length", "max_target_len", "num_beams", "max_new_tokens"):
            require(getattr(self, key) >= 1, f"{at}.{key}", getattr(self, key), "an integer >= 1")
        require(self.pooling in POOLINGS, f"{at}.pooling", self.pooling, f"one of {', '.join(POOLINGS)}")
