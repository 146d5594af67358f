"""Training throughput of lmforge (1 and 2 workers) against plain PyTorch and torchrun DDP, plus cold start.

    python bench/train_bench.py [--steps 40] [--warmup 5]

All four runs train the same model on the same prepared data for the same number of steps, with the same
micro batch per process and one torch thread per process. lmforge runs as users run it: `lmforge train`
in a fresh process with its own embedded Ray cluster. Tokens/s comes from the median per-step time after
the warm-up steps, timed the same way everywhere (batch, forward, backward, optimizer update; no eval or
checkpoint), because this machine may be shared and the median shrugs off another job's bursts.
The results replace the "Training throughput" section of bench/RESULTS.md; other sections are kept.
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
from datetime import datetime
from pathlib import Path

BENCH = Path(__file__).resolve().parent
SECTION = "Training throughput"
THREADS = 1  # Ray gives each 1-CPU worker OMP_NUM_THREADS=1; the baselines are pinned to match


def workload(steps: int) -> list[str]:
    """The shared lmforge overrides: gpt-mini at 256 tokens, where per-step compute dominates."""
    return ["model=gpt-mini", "data.seq_len=256", "trainer.micro_batch_size=8", f"trainer.max_steps={steps}",
            "trainer.warmup_steps=4", "trainer.log_every=1", "trainer.eval_every=0", "trainer.eval_batches=1",
            f"checkpoint.every={steps}", "checkpoint.keep_last=1", "tracking=mlflow-local"]


def run_lmforge(base: list[str], workers: int, scratch: str) -> dict:
    """`lmforge train` in a fresh process; per-step times and the first step's end come from its MLflow run."""
    from mlflow.tracking import MlflowClient

    from orchestrator.config import load_config
    from orchestrator.launcher import ray_temp_dir
    from orchestrator.runs import read_run_info, storage_root
    from orchestrator.tracking import tracking_uri

    name = f"bench-w{workers}-{int(time.time())}"
    overrides = base + [f"hardware.workers={workers}", f"run_name={name}"]
    cfg = load_config(overrides)
    launched = time.time()
    with open(f"{scratch}/{name}.log", "w") as log:
        code = subprocess.run([sys.executable, "-m", "orchestrator.cli", "train"] + overrides, stdout=log,
                              stderr=subprocess.STDOUT).returncode
    if code != 0:
        sys.exit(f"lmforge train failed; see {scratch}/{name}.log")
    run_id = read_run_info(f"{storage_root(cfg)}/{name}")["mlflow_run_id"]
    client = MlflowClient(tracking_uri(cfg.tracking, cfg.paths.root))
    history = sorted(client.get_metric_history(run_id, "train/step_time_s"), key=lambda m: m.step)
    first_step_at = history[0].timestamp / 1000  # logged by rank 0 right after step 1
    return {"step_times": [m.value for m in history],
            "phases": cold_start_phases(name, launched, first_step_at, ray_temp_dir(cfg) or "/tmp/ray",
                                        history[0].value)}


def cold_start_phases(name: str, launched: float, first_step_at: float, ray_tmp: str, step1_s: float) -> dict:
    """Split launch -> end of step 1 at timestamps Ray leaves behind: session start, Train controller logs."""
    def started(session: Path) -> float:
        return datetime.strptime("_".join(session.name.split("_")[1:4]), "%Y-%m-%d_%H-%M-%S_%f").timestamp()

    session = min((s for s in Path(ray_tmp).glob("session_2*") if started(s) >= launched), key=started)
    ray_init_at = started(session)
    controller, launched_fn = None, None
    for log in Path(session, "logs", "train").glob("ray-train-sys-*.log"):
        for line in log.read_text().splitlines():
            record = json.loads(line)
            if record.get("run_name") != name:
                continue
            at = record["timestamp_ns"] / 1e9
            if record.get("component") == "controller":
                controller = min(controller or at, at)
            if "Launching training function" in record["message"]:
                launched_fn = max(launched_fn or at, at)
    return {"lmforge CLI: Python start, imports, config, prepared-data check, MLflow run": ray_init_at - launched,
            "ray.init (embedded cluster) and Ray Train controller start": controller - ray_init_at,
            "Ray Train worker group: worker actors, torch import, gloo process group": launched_fn - controller,
            "train_loop: imports, model, DeepSpeed init (split below)": first_step_at - step1_s - launched_fn,
            "step 1": step1_s, "total": first_step_at - launched}


def run_torch(base: list[str], prepared: str, nproc: int, scratch: str) -> dict:
    """bench/torch_loop.py as a plain process (nproc=1) or under torchrun with DDP over gloo."""
    out = f"{scratch}/torch-{nproc}.json"
    launch = [sys.executable] + (["-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                                  "--master_port", "29533"] if nproc > 1 else [])
    subprocess.run(launch + [str(BENCH / "torch_loop.py"), "--prepared", prepared, "--threads", str(THREADS),
                             "--out", out] + base, check=True, env=os.environ | {"OMP_NUM_THREADS": str(THREADS)})
    return json.loads(Path(out).read_text())


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

    from model.gpt import build_model
    lap("import transformers")
    import deepspeed  # noqa: F401
    lap("import deepspeed")
    import orchestrator.worker  # noqa: F401  (ray.train and the rest of lmforge)
    from data.prepared import open_tokenizer
    from orchestrator.config import load_config
    from orchestrator.engine import build_engine
    lap("import ray.train and lmforge")
    cfg = load_config(overrides)
    model = build_model(cfg.model, open_tokenizer(prepared), cfg.seed)
    lap("build model")
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    with tempfile.NamedTemporaryFile() as store:
        torch.distributed.init_process_group("gloo", init_method=f"file://{store.name}", rank=0, world_size=1)
        build_engine(model, cfg, 1)
        lap("deepspeed.initialize")
        torch.distributed.destroy_process_group()
    print(json.dumps(laps))


def tokens_per_second(times: list[float], warmup: int, tokens_per_step: int) -> dict:
    steady = times[warmup:]
    return {"median": tokens_per_step / statistics.median(steady), "mean": tokens_per_step / statistics.mean(steady)}


def machine() -> str:
    import torch

    found = re.search(r"Model name:\s*(.+)", subprocess.run(["lscpu"], capture_output=True, text=True).stdout)
    return (f"{os.cpu_count()} CPU cores (`nproc`), {found.group(1).strip() if found else 'unknown CPU'} "
            f"(`lscpu` model name), no GPU; Python {platform.python_version()}, torch {torch.__version__}")


def render(args, rows: dict, cold: dict, cold_w2: float, probe: dict, loads: list, params: int) -> str:
    lines = [f"## {SECTION}", "",
             f"Measured {time.strftime('%Y-%m-%d %H:%M')} with `python bench/train_bench.py --steps {args.steps} "
             f"--warmup {args.warmup}` on {machine()}.", "",
             f"Workload: `{' '.join(workload(args.steps))}`: gpt-mini ({params / 1e6:.2f}M parameters), "
             f"256-token blocks, micro batch 8 per process, {args.steps} steps, of which the first "
             f"{args.warmup} are warm-up and not counted. lmforge is `lmforge train` with its defaults otherwise: "
             "embedded Ray cluster, DeepSpeed ZeRO-2, gloo, fp32, MLflow to the local SQLite store "
             "(`tracking=mlflow-local`; its per-step `train/step_time_s` is what is read back, and logging "
             "happens outside the timed step). The baselines are `bench/torch_loop.py`: the same HF model, "
             "AdamW hyperparameters, LR schedule, clipping and batches; no DeepSpeed, no Ray. Threads: one "
             "torch thread per process everywhere (Ray sets OMP_NUM_THREADS=1 in each 1-CPU worker; the "
             "baselines get OMP_NUM_THREADS=1 and `torch.set_num_threads(1)`). Tokens/s is global, from the "
             "median step time; the mean is shown too.", "",
             "| run | processes | tokens/s (median) | tokens/s (mean) | ratio (median) | goal >= 0.95 |",
             "|---|---|---|---|---|---|"]
    pairs = {"lmforge, 1 worker": "plain PyTorch loop", "lmforge, 2 workers": "torchrun DDP"}
    for name, (procs, tps) in rows.items():
        base = pairs.get(name)
        ratio = tps["median"] / rows[base][1]["median"] if base else None
        lines.append(f"| {name} | {procs} | {tps['median']:,.0f} | {tps['mean']:,.0f} | "
                     + (f"{ratio:.2f}x {base} | {'met' if ratio >= 0.95 else 'missed'} |" if base else "baseline | |"))
    lines += ["", "1-minute load average before each run: " + ", ".join(f"{n} {v:.1f}" for n, v in loads)
              + ". Above about 2 on this 2-core machine, other jobs shared the CPUs during that run.", "",
              "### Cold start", "",
              f"Time from launching `lmforge train` (1 worker, data already prepared) to the end of its first "
              f"step: **{cold['total']:.1f} s** (issue aim: <= 15 s). It is the first run in a fresh `paths.root`, so it "
              f"also creates the MLflow SQLite store; the 2-worker run after it took {cold_w2:.1f} s. Phases, from the launch time, the Ray session's start time, the Ray Train "
              "controller's log timestamps and the MLflow timestamp of step 1:", "",
              "| phase | seconds |", "|---|---|"]
    lines += [f"| {name} | {seconds:.1f} |" for name, seconds in cold.items() if name != "total"]
    lines += ["", "The `train_loop` share, timed one phase after another in a fresh process doing the same "
              "set-up (`python bench/train_bench.py --probe`):", "", "| phase | seconds |", "|---|---|"]
    lines += [f"| {name} | {seconds:.1f} |" for name, seconds in probe.items()]
    return "\n".join(lines) + "\n"


def write_section(path: Path, section: str) -> None:
    """Replace only our section; re-read first, since others add their own sections to this file."""
    text = path.read_text() if path.exists() else "# lmforge benchmarks\n"
    pattern = re.compile(rf"^## {re.escape(SECTION)}\n.*?(?=^## |\Z)", re.M | re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text.rstrip("\n") + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=5, help="first steps left out of tokens/s")
    parser.add_argument("--root", help="lmforge paths.root (default: a fresh temporary directory)")
    parser.add_argument("--results", type=Path, default=BENCH / "RESULTS.md")
    parser.add_argument("--probe", nargs="+", metavar=("PREPARED", "OVERRIDE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        return probe_worker_setup(args.probe[0], args.probe[1:])

    from orchestrator.quiet import set_verbosity
    set_verbosity(verbose=False)  # the same quiet, offline environment `lmforge train` gives its workers

    from data.prepared import open_tokenizer, prepare_training_data
    from model.gpt import build_model
    from orchestrator.config import load_config

    scratch = tempfile.mkdtemp(prefix="lmforge-bench-")
    base = workload(args.steps) + [f"paths.root={args.root or scratch}"]
    cfg = load_config(base)
    prepared = str(prepare_training_data(cfg.data, cfg.paths.root, cfg.seed))
    params = sum(p.numel() for p in build_model(cfg.model, open_tokenizer(prepared), cfg.seed).parameters())
    per_process = cfg.trainer.micro_batch_size * cfg.data.seq_len

    rows, loads, cold = {}, [], {}
    for name, procs in (("plain PyTorch loop", 1), ("lmforge, 1 worker", 1), ("torchrun DDP", 2),
                        ("lmforge, 2 workers", 2)):
        loads.append((name, os.getloadavg()[0]))
        print(f"bench: {name}, {procs} process(es), {args.steps} steps", flush=True)
        if name.startswith("lmforge"):
            out = run_lmforge(base, procs, scratch)
            cold[procs] = out["phases"]
        else:
            out = run_torch(base, prepared, procs, scratch)
        rows[name] = (procs, tokens_per_second(out["step_times"], args.warmup, per_process * procs))
        print(f"bench: {name}: {rows[name][1]['median']:,.0f} tokens/s", flush=True)

    probe = json.loads(subprocess.run([sys.executable, __file__, "--probe", prepared] + base, check=True,
                                      capture_output=True, text=True, env=os.environ | {"OMP_NUM_THREADS": "1"})
                       .stdout.strip().splitlines()[-1])
    section = render(args, rows, cold[1], cold[2]["total"], probe, loads, params)
    write_section(args.results, section)
    print(section)


if __name__ == "__main__":
    main()
