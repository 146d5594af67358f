"""Shared builders for the data tests: small configs and corpora written to tmp dirs."""

import random

from data.config import CleanConfig, DataConfig, TokenizerConfig

WORDS = [
    "alpha",
    "beta",
    "gamma",
    "delta",
    "epsilon",
    "zeta",
    "eta",
    "theta",
    "iota",
    "kappa",
    "lambda",
    "mu",
    "nu",
    "xi",
    "omicron",
    "pi",
    "rho",
    "sigma",
    "tau",
    "upsilon",
    "phi",
    "chi",
    "psi",
    "omega",
    "river",
    "stone",
    "cloud",
    "lantern",
    "harbor",
    "meadow",
    "copper",
    "violet",
]


def make_cfg(source: str, paths: list, **overrides) -> DataConfig:
    settings = {"name": "t", "seq_len": 32, "val_fraction": 0.2, "clean": CleanConfig(),
                "tokenizer": TokenizerConfig(vocab_size=300, min_frequency=1)} | overrides
    cfg = DataConfig(source=source, paths=[str(p) for p in paths], **settings)
    cfg.validate()
    return cfg


def make_docs(n: int, seed: int = 0, words: int = 60) -> list[str]:
    rng = random.Random(seed)
    return [f"doc {i}: " + " ".join(rng.choice(WORDS) for _ in range(words)) for i in range(n)]
