"""A stand-in tokenizer with just what model builders read: special-token ids and a vocabulary size."""


class StubTokenizer:
    bos_token_id = eos_token_id = 0
    pad_token_id = 1

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def __len__(self):
        return self.vocab_size
