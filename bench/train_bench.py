"""Training throughput of lmforge (1 and 2 workers) against plain PyTorch and torchrun DDP, plus cold start.

    python bench/train_bench.py [--steps 100]
    python bench/train_bench.py --system-metrics [--steps 100] [--rounds 3]   (what tracking.system_metrics costs)

All runs train the same model on the same prepared data for the same number of steps, with the same
micro batch per process and one torch thread per process. lmforge runs as users run it: `lmforge train`
in a fresh process with its own embedded Ray cluster, logging every `trainer.log_every` (default 10)
steps. Step time is compared in the windows lmforge logs: lmforge's `train/step_time_s` is the mean
optimizer-step time of each window (batch, forward, backward, update; no eval or checkpoint), and the
baselines' per-step times are averaged over the same windows. The first window (warm-up) is left out and
tokens/s comes from the median window, because this machine may be shared and the median shrugs off
another job's bursts. The results replace the "Training throughput" section of bench/RESULTS.md.
"""

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
SECTION = "Training throughput"
SYSTEM_SECTION = "System metrics cost"
THREADS = 1  # Ray gives each 1-CPU worker OMP_NUM_THREADS=1; the baselines are pinned to match


WINDOW = 10  # lmforge's default trainer.log_every
# Not a goal row: lmforge's DeepSpeed engine and step under torchrun, no Ray, to split the 2-worker gap.
DEEPSPEED_ONLY = "DeepSpeed ZeRO-2 under torchrun, no Ray"


def workload(steps: int) -> list[str]:
    """The shared lmforge overrides: gpt-mini at 256 tokens, where per-step compute dominates."""
    return ["model=gpt-mini", "data.seq_len=256", "trainer.micro_batch_size=8", f"trainer.max_steps={steps}",
            "trainer.warmup_steps=4", f"trainer.log_every={WINDOW}", "trainer.eval_every=0",
            "trainer.eval_batches=1", f"checkpoint.every={steps}", "checkpoint.keep_last=1", "tracking=mlflow-local"]


def run_lmforge(base: list[str], workers: int, scratch: str) -> dict:
    """`lmforge train` in a fresh process; window step times from its MLflow run, start-up from its output."""
    from mlflow.tracking import MlflowClient

    from orchestrator.config import load_config
    from orchestrator.runs import read_run_info, storage_root
    from orchestrator.tracking import tracking_uri

    name = f"bench-w{workers}-{int(time.time())}"
    overrides = base + [f"hardware.workers={workers}", f"run_name={name}"]
    cfg = load_config(overrides)
    with open(f"{scratch}/{name}.log", "w") as log:
        code = subprocess.run([sys.executable, "-m", "orchestrator.cli", "train"] + overrides, stdout=log,
                              stderr=subprocess.STDOUT).returncode
    output = Path(f"{scratch}/{name}.log").read_text()
    if code != 0:
        sys.exit(f"lmforge train failed; see {scratch}/{name}.log")
    run_id = read_run_info(f"{storage_root(cfg)}/{name}")["mlflow_run_id"]
    client = MlflowClient(tracking_uri(cfg.tracking, cfg.paths.root))
    history = sorted(client.get_metric_history(run_id, "train/step_time_s"), key=lambda m: m.step)
    # lmforge prints: "first step:  16.8s after launch (python_and_imports 2.0s, data_prepared 0.0s, ...)"
    found = re.search(r"first step:\s+([\d.]+)s after launch \((.*)\)", output)
    phases = dict((name, float(secs)) for name, secs in re.findall(r"(\w+) ([\d.]+)s", found.group(2)))
    system = [key for key in client.get_run(run_id).data.metrics if key.startswith("system/")]
    return {"windows": [m.value for m in history if m.step % WINDOW == 0],
            "cold_start": {"total": float(found.group(1))} | phases, "system_metrics": len(system)}


def run_torch(base: list[str], prepared: str, nproc: int, scratch: str, deepspeed: bool = False,
              threads: int = THREADS) -> dict:
    """bench/torch_loop.py as a plain process (nproc=1) or under torchrun: DDP, or lmforge's DeepSpeed engine
    without Ray."""
    out = f"{scratch}/torch-{nproc}.json"
    launch = [sys.executable] + (["-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                                  "--master_port", "29533"] if nproc > 1 else [])
    subprocess.run(launch + [str(BENCH / "torch_loop.py"), "--prepared", prepared, "--threads", str(threads),
                             "--out", out] + (["--deepspeed"] if deepspeed else []) + base, check=True,
                   env=os.environ | {"OMP_NUM_THREADS": str(threads)})
    times = json.loads(Path(out).read_text())["step_times"]
    return {"windows": [statistics.mean(times[i:i + WINDOW]) for i in range(0, len(times) - WINDOW + 1, WINDOW)]}


def probe_worker_setup(prepared: str, overrides: list[str]) -> None:
    """In a fresh process: time the set-up an lmforge worker does before its first step; print JSON."""
    laps, started = {}, time.perf_counter()

    def lap(name: str) -> None:
        nonlocal started
        laps[name] = time.perf_counter() - started
        started = time.perf_counter()

    import torch
    lap("import torch")
    import transformers  # noqa: F401

    from model.build import build_model
    lap("import transformers")
    from orchestrator.engine import import_deepspeed
    import_deepspeed()
    lap("import deepspeed")
    import orchestrator.worker  # noqa: F401  (ray.train and the rest of lmforge)
    from data.prepared import read_vocabulary
    from orchestrator.config import load_config
    from orchestrator.engine import build_engine
    lap("import ray.train and lmforge")
    cfg = load_config(overrides)
    model = build_model(cfg.model, read_vocabulary(prepared).size, cfg.seed)
    lap("build model")
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    with tempfile.NamedTemporaryFile() as store:
        torch.distributed.init_process_group("gloo", init_method=f"file://{store.name}", rank=0, world_size=1)
        build_engine(model, cfg, 1)
        lap("deepspeed.initialize")
        torch.distributed.destroy_process_group()
    print(json.dumps(laps))


def tokens_per_second(windows: list[float], tokens_per_step: int) -> dict:
    return {"median": tokens_per_step / statistics.median(windows),
            "mean": tokens_per_step / statistics.mean(windows)}


def machine() -> str:
    import torch

    found = re.search(r"Model name:\s*(.+)", subprocess.run(["lscpu"], capture_output=True, text=True).stdout)
    return (f"{os.cpu_count()} CPU cores (`nproc`), {found.group(1).strip() if found else 'unknown CPU'} "
            f"(`lscpu` model name), no GPU; Python {platform.python_version()}, torch {torch.__version__}")


def render(args, rows: dict, per_round: dict, cold: dict[int, list[dict]], probe: dict, loads: list,
           params: int) -> str:
    lines = [f"## {SECTION}", "",
             f"Measured {time.strftime('%Y-%m-%d %H:%M')} with `python bench/train_bench.py --steps {args.steps} "
             f"--rounds {args.rounds}` on {machine()}.", "",
             f"Workload: `{' '.join(workload(args.steps))}`: gpt-mini ({params / 1e6:.2f}M parameters), "
             f"256-token blocks, micro batch 8 per process, {args.steps} steps per run. lmforge is `lmforge train` "
             "with its defaults otherwise: embedded Ray cluster, DeepSpeed ZeRO-2, gloo, fp32, MLflow to the "
             f"local SQLite store, metrics every {WINDOW} steps (the default). The baselines are "
             "`bench/torch_loop.py`: the same HF model, AdamW hyperparameters, LR schedule, clipping and "
             "batches; no DeepSpeed, no Ray. The row `" + DEEPSPEED_ONLY + "` runs lmforge's own DeepSpeed "
             "engine and step function under torchrun instead of Ray Train, for diagnosis. Threads: one torch thread per process everywhere (Ray sets "
             "OMP_NUM_THREADS=1 in each 1-CPU worker; the baselines get OMP_NUM_THREADS=1 and "
             f"`torch.set_num_threads(1)`). Step time is the mean over each {WINDOW}-step window (lmforge's own "
             "`train/step_time_s`; the baselines' per-step times averaged the same way), the first window of "
             f"each run left out; the {args.rounds} rounds run the five configurations one after another and "
             "pool their windows. Tokens/s is global, from the median window; the mean is shown too. The "
             "last column gives the ratio within each round alone (median windows), to show the spread.", "",
             "| run | processes | tokens/s (median) | tokens/s (mean) | ratio (median) | goal >= 0.95 | "
             "ratio by round |",
             "|---|---|---|---|---|---|---|"]
    pairs = {"lmforge, 1 worker": "plain PyTorch loop", "lmforge, 2 workers": "torchrun DDP",
             DEEPSPEED_ONLY: "torchrun DDP"}
    for name, (procs, tps) in rows.items():
        base = pairs.get(name)
        ratio = tps["median"] / rows[base][1]["median"] if base else None
        verdict = "" if name == DEEPSPEED_ONLY else ("met" if base and ratio >= 0.95 else "missed")
        by_round = ", ".join(f"{mine / theirs:.2f}" for mine, theirs in zip(per_round[name], per_round[base])) \
            if base else ""
        lines.append(f"| {name} | {procs} | {tps['median']:,.0f} | {tps['mean']:,.0f} | "
                     + (f"{ratio:.2f}x {base} | {verdict} | {by_round} |" if base else "baseline | | |"))
    lines += ["", "1-minute load average before each run: " + ", ".join(f"{n} {v:.1f}" for n, v in loads)
              + ". Above about 2 on this 2-core machine, other jobs shared the CPUs during that run.", "",
              "### Cold start", "",
              "Time from launching `lmforge train` (data already prepared) to the end of its first step, as "
              "lmforge prints it (issue aim: <= 15 s). Round 1 is the first run in a fresh `paths.root`, so it "
              "also creates the MLflow SQLite store.", "",
              "| run | " + " | ".join(f"round {i + 1}" for i in range(args.rounds)) + " |",
              "|---|" + "---|" * args.rounds]
    lines += [f"| lmforge, {procs} worker{'s' if procs > 1 else ''} | "
              + " | ".join(f"{c['total']:.1f} s" for c in runs) + " |" for procs, runs in cold.items()]
    lines += ["", f"Phases of the 1-worker run in round {args.rounds}:", "", "| phase | seconds |", "|---|---|"]
    lines += [f"| {name} | {seconds:.1f} |" for name, seconds in cold[1][-1].items() if name != "total"]
    lines += ["", "The workers' share of `worker_started` and `deepspeed_ready`, timed one phase after another "
              "in a fresh process doing the same set-up (`python bench/train_bench.py --probe`):", "",
              "| phase | seconds |", "|---|---|"]
    lines += [f"| {name} | {seconds:.1f} |" for name, seconds in probe.items()]
    return "\n".join(lines) + "\n"


def system_metrics_cost(args, base: list[str], scratch: str, per_process: int) -> str:
    """lmforge with tracking.system_metrics off and on, alternating (the order flips each round, so a drift in
    the machine's load falls on both); returns the section for RESULTS.md."""
    windows, loads, sampled = {False: [], True: []}, [], []
    for round_ in range(args.rounds):
        for on in ((False, True) if round_ % 2 == 0 else (True, False)):
            loads.append(os.getloadavg()[0])
            print(f"bench: round {round_ + 1}: tracking.system_metrics={str(on).lower()}", flush=True)
            out = run_lmforge(base + [f"tracking.system_metrics={str(on).lower()}"], args.workers, scratch)
            windows[on] += out["windows"][1:]  # the first window holds the warm-up steps
            if on:
                sampled.append(out["system_metrics"])
    off, on = statistics.median(windows[False]), statistics.median(windows[True])
    lines = [f"## {SYSTEM_SECTION}", "",
             f"Measured {time.strftime('%Y-%m-%d %H:%M')} with `python bench/train_bench.py --system-metrics "
             f"--steps {args.steps} --rounds {args.rounds} --workers {args.workers}` on {machine()}.", "",
             f"The training-throughput workload (`{' '.join(workload(args.steps))}`) on {args.workers} worker(s), "
             "with `tracking.system_metrics` off and on in alternating runs. On, MLflow's SystemMetricsMonitor "
             "samples CPU, memory, disk and network (and GPU where there is one) every 10 s on rank 0 and logs "
             f"them as system/* metrics ({', '.join(map(str, sampled))} keys per run). Step time is lmforge's "
             f"`train/step_time_s` per {WINDOW}-step window, first window left out, median over all runs.", "",
             "| tracking.system_metrics | windows | median step time | tokens/s (median) |", "|---|---|---|---|"]
    tokens = per_process * args.workers
    for flag, median in ((False, off), (True, on)):
        lines.append(f"| {str(flag).lower()} | {len(windows[flag])} | {median:.4f} s | {tokens / median:,.0f} |")
    lines += ["", f"On/off step-time ratio: {on / off:.3f}. 1-minute load average before each run: "
              + ", ".join(f"{v:.1f}" for v in loads) + " (above about 2 on this 2-core machine, other jobs shared "
              "the CPUs)."]
    return "\n".join(lines) + "\n"


def write_section(path: Path, section: str, title: str = SECTION) -> None:
    """Replace only our section; re-read first, since others add their own sections to this file."""
    text = path.read_text() if path.exists() else "# lmforge benchmarks\n"
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.M | re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text.rstrip("\n") + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps per run")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of the five runs, windows pooled")
    parser.add_argument("--root", help="lmforge paths.root (default: a fresh temporary directory)")
    parser.add_argument("--results", type=Path, default=BENCH / "RESULTS.md")
    parser.add_argument("--system-metrics", action="store_true",
                        help="measure only what tracking.system_metrics costs (its own RESULTS.md section)")
    parser.add_argument("--workers", type=int, default=1, help="workers for --system-metrics")
    parser.add_argument("--probe", nargs="+", metavar=("PREPARED", "OVERRIDE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        return probe_worker_setup(args.probe[0], args.probe[1:])

    from orchestrator.quiet import set_verbosity
    set_verbosity(verbose=False)  # the same quiet, offline environment `lmforge train` gives its workers

    from data.prepared import prepare_training_data, read_vocabulary
    from model.build import build_model
    from orchestrator.config import load_config

    scratch = tempfile.mkdtemp(prefix="lmforge-bench-")
    base = workload(args.steps) + [f"paths.root={args.root or scratch}"]
    cfg = load_config(base)
    prepared = str(prepare_training_data(cfg.data, cfg.paths.root, cfg.seed))
    params = sum(p.numel() for p in build_model(cfg.model, read_vocabulary(prepared).size, cfg.seed).parameters())
    per_process = cfg.trainer.micro_batch_size * cfg.data.seq_len
    if args.system_metrics:
        section = system_metrics_cost(args, base, scratch, per_process)
        write_section(args.results, section, SYSTEM_SECTION)
        print(section)
        return

    runs = (("plain PyTorch loop", 1), ("lmforge, 1 worker", 1), ("torchrun DDP", 2),
            (DEEPSPEED_ONLY, 2), ("lmforge, 2 workers", 2))
    windows, loads, cold = {name: [] for name, _ in runs}, [], {}
    per_round = {name: [] for name, _ in runs}  # median-window tokens/s of each round
    for round_ in range(args.rounds):
        for name, procs in runs:
            loads.append((f"{name} (round {round_ + 1})", os.getloadavg()[0]))
            print(f"bench: round {round_ + 1}: {name}, {procs} process(es), {args.steps} steps", flush=True)
            if name.startswith("lmforge"):
                out = run_lmforge(base, procs, scratch)
                cold.setdefault(procs, []).append(out["cold_start"])
            else:
                out = run_torch(base, prepared, procs, scratch, deepspeed=name == DEEPSPEED_ONLY)
            windows[name] += out["windows"][1:]  # the first window holds the warm-up steps
            per_round[name].append(per_process * procs / statistics.median(out["windows"][1:]))
    rows = {name: (procs, tokens_per_second(windows[name], per_process * procs)) for name, procs in runs}
    for name, (_, tps) in rows.items():
        print(f"bench: {name}: {tps['median']:,.0f} tokens/s", flush=True)

    probe = json.loads(subprocess.run([sys.executable, __file__, "--probe", prepared] + base, check=True,
                                      capture_output=True, text=True, env=os.environ | {"OMP_NUM_THREADS": "1"})
                       .stdout.strip().splitlines()[-1])
    section = render(args, rows, per_round, cold, probe, loads, params)
    write_section(args.results, section)
    print(section)


if __name__ == "__main__":
    main()
