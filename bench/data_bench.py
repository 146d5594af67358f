"""Data pipeline benchmark: prepare MB/s vs raw HF tokenizers, and loader tokens/s vs a training step.

    python bench/data_bench.py [--mb 40] [--steps 20] [--rounds 3]

Ratios reported (goals from the data issue): prepare >= 0.7x raw `tokenizers` batch encoding of the same
text on the same cores; loader >= 10x the tokens/s one training step consumes (default config, gpt-mini).
"""

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def make_corpus(path: Path, megabytes: float) -> tuple[int, list[str]]:
    """JSONL of unique documents made by reshuffling paragraphs of the embedded Python reference."""
    from data.corpus import embedded_documents

    paragraphs = [p for doc in embedded_documents() for p in doc.split("\n\n") if p.strip()]
    rng, texts, size = random.Random(0), [], 0
    while size < megabytes * 1e6:
        text = f"Document {len(texts)}.\n\n" + "\n\n".join(rng.sample(paragraphs, 12))
        texts.append(text)
        size += len(text.encode())
    with open(path, "w") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in texts)
    return size, texts


def bench_raw_tokenizer(tokenizer_json: str, texts: list[str]) -> float:
    """Seconds for HF tokenizers to batch-encode all texts using every core (its own Rust threads)."""
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tokenizer_json)
    started = time.perf_counter()
    for i in range(0, len(texts), 1000):
        tok.encode_batch_fast(texts[i:i + 1000], add_special_tokens=False)
    return time.perf_counter() - started


def bench_training_step(cfg, tokenizer, steps: int) -> float:
    """Tokens/s one worker's forward+backward+AdamW step consumes on this machine (fp32, CPU)."""
    import torch

    from model.build import build_model

    model = build_model(cfg.model, len(tokenizer), cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = torch.randint(0, len(tokenizer), (cfg.trainer.micro_batch_size, cfg.data.seq_len))
    timings = []
    for _ in range(steps + 2):
        started = time.perf_counter()
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        timings.append(time.perf_counter() - started)
    per_step = sorted(timings[2:])[len(timings[2:]) // 2]
    return batch.numel() / per_step


def bench_loader(store, micro_batch_size: int, seconds: float = 3.0) -> float:
    from data.loader import ResumableLoader

    loader = ResumableLoader(store, micro_batch_size, 0, 1, seed=0)
    tokens, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        tokens += sum(len(sample["input_ids"]) for sample in loader.next_batch())
    return tokens / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=40.0, help="corpus size in MB")
    parser.add_argument("--steps", type=int, default=20, help="training steps to time")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved raw/ray/local rounds (medians)")
    args = parser.parse_args()
    from orchestrator.quiet import set_verbosity

    set_verbosity(False)
    import ray

    from data.prepared import open_split, prepare_training_data, read_meta
    from data.tokenizer import train_tokenizer
    from orchestrator.config import load_config

    cfg = load_config([])  # the default run: gpt-mini, seq_len 256, micro_batch_size 8
    work = Path(tempfile.mkdtemp(prefix="lmforge-data-bench-"))
    size, texts = make_corpus(work / "corpus.jsonl", args.mb)
    tokenizer = train_tokenizer(texts[:2000], cfg.data.tokenizer)
    tokenizer.save_pretrained(str(work / "tokenizer"))
    tokenizer_json = tokenizer.backend_tokenizer.to_str()

    data = cfg.data
    data.source, data.paths, data.name = "jsonl", [str(work / "corpus.jsonl")], "bench"
    data.tokenizer.kind, data.tokenizer.path = "pretrained", str(work / "tokenizer")
    cpus = os.cpu_count()
    started = time.perf_counter()
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    ray_start_s = time.perf_counter() - started
    # Interleaved rounds, medians reported: one-off load on the machine hits all three alike.
    timings = {"raw": [], "ray": [], "local": []}
    for round_ in range(args.rounds):
        timings["raw"].append(bench_raw_tokenizer(tokenizer_json, texts))
        for engine in ("ray", "local"):
            started = time.perf_counter()
            out = prepare_training_data(data, work / f"{engine}-{round_}", cfg.seed, engine=engine)
            timings[engine].append(time.perf_counter() - started)
    ray.shutdown()
    del texts
    results = {name: sorted(values)[len(values) // 2] for name, values in timings.items()}
    meta = read_meta(out)
    store = open_split(out, "train")
    loader_tps = bench_loader(store, cfg.trainer.micro_batch_size)
    step_tps = bench_training_step(cfg, tokenizer, args.steps)

    raw_mbs = size / 1e6 / results["raw"]
    report = {
        "machine": f"{platform.processor() or platform.machine()}, {cpus} CPU cores, {platform.system()}",
        "corpus_MB": round(size / 1e6, 1), "documents": meta["counts"]["documents_read"],
        "tokens": meta["counts"]["tokens_from_documents"],
        "raw_tokenizers_MB_s": round(raw_mbs, 2),
        "ray_start_s (excluded)": round(ray_start_s, 1), "rounds": args.rounds,
        "seconds_per_round": {name: [round(v, 2) for v in values] for name, values in timings.items()},
    }
    for engine in ("ray", "local"):
        mbs = size / 1e6 / results[engine]
        report[f"prepare_{engine}_MB_s"] = round(mbs, 2)
        report[f"prepare_{engine}_vs_raw"] = round(mbs / raw_mbs, 2)
    report |= {"loader_tokens_s": round(loader_tps), "train_step_tokens_s (gpt-mini, B=8, T=256)": round(step_tps),
               "loader_vs_step": round(loader_tps / step_tps, 1)}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
