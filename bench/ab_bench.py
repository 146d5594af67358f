"""A/B of `lmforge train` step time: a base git revision against the working tree, in alternating rounds.

    python bench/ab_bench.py --base d4aefec [--steps 100] [--rounds 3] [--workers 1]

Both sides run bench/train_bench.py's workload (gpt-mini, 256-token blocks, causal LM) as users run it, in a
fresh process with its own embedded Ray cluster; the base runs from a `git worktree` of the revision, put
first on PYTHONPATH so the driver and the Ray workers it starts import that code. Step time is lmforge's own
`train/step_time_s` per logging window, the first window of each run left out; the result is the ratio of
median windows, pooled over rounds and per round. The results replace the section "A/B against a base
revision" of bench/RESULTS.md.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
SECTION = "A/B against a base revision"
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(ROOT))

from train_bench import WINDOW, machine, workload, write_section  # noqa: E402


def run(tree: Path, overrides: list[str], name: str, scratch: str) -> list[float]:
    """Window step times of one `lmforge train` run of the code in `tree`."""
    from mlflow.tracking import MlflowClient

    from orchestrator.config import load_config
    from orchestrator.runs import read_run_info, storage_root
    from orchestrator.tracking import tracking_uri

    overrides = overrides + [f"run_name={name}"]
    env = os.environ | {"PYTHONPATH": str(tree)}
    with open(f"{scratch}/{name}.log", "w") as log:
        code = subprocess.run([sys.executable, "-m", "orchestrator.cli", "train", *overrides], cwd=tree, env=env,
                              stdout=log, stderr=subprocess.STDOUT).returncode
    if code != 0:
        sys.exit(f"lmforge train failed; see {scratch}/{name}.log")
    cfg = load_config(overrides)
    run_id = read_run_info(f"{storage_root(cfg)}/{name}")["mlflow_run_id"]
    history = MlflowClient(tracking_uri(cfg.tracking, cfg.paths.root)).get_metric_history(run_id, "train/step_time_s")
    return [m.value for m in sorted(history, key=lambda m: m.step) if m.step % WINDOW == 0][1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="git revision to compare the working tree against")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--results", type=Path, default=BENCH / "RESULTS.md")
    args = parser.parse_args()
    base_rev = subprocess.run(["git", "rev-parse", "--short", args.base], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    head_rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="lmforge-ab-") as scratch:
        tree = Path(scratch) / "base"
        subprocess.run(["git", "worktree", "add", "--detach", "-q", str(tree), args.base], cwd=ROOT, check=True)
        try:
            overrides = workload(args.steps) + [f"hardware.workers={args.workers}", f"paths.root={scratch}/home"]
            windows = {"base": [], "head": []}
            per_round = []
            for i in range(args.rounds):
                got = {}
                # Alternate which side goes first, so a slow spell of the shared machine hits both.
                for side in (("base", "head") if i % 2 == 0 else ("head", "base")):
                    got[side] = run(tree if side == "base" else ROOT, overrides, f"{side}-{i}", scratch)
                    windows[side] += got[side]
                per_round.append(statistics.median(got["base"]) / statistics.median(got["head"]))
                print(f"round {i + 1}: base {statistics.median(got['base']):.4f} s/step, head "
                      f"{statistics.median(got['head']):.4f} s/step", flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, check=False)
    base_s, head_s = statistics.median(windows["base"]), statistics.median(windows["head"])
    section = "\n".join([
        f"## {SECTION}", "",
        f"Measured {time.strftime('%Y-%m-%d %H:%M')} with `python bench/ab_bench.py --base {args.base} --steps "
        f"{args.steps} --rounds {args.rounds} --workers {args.workers}` on {machine()}: the working tree "
        f"(HEAD {head_rev} plus uncommitted changes, if any) against {base_rev}, on train_bench's workload "
        f"(`{' '.join(workload(args.steps))}`), {args.workers} worker(s), rounds alternating which side "
        "runs first.", "",
        "| side | median s/step | tokens/s (median) |", "|---|---|---|",
        f"| base {base_rev} | {base_s:.4f} | {8 * 256 * args.workers / base_s:,.0f} |",
        f"| head {head_rev} | {head_s:.4f} | {8 * 256 * args.workers / head_s:,.0f} |", "",
        f"Head throughput over base: **{base_s / head_s:.3f}x** (per round: "
        + ", ".join(f"{r:.3f}" for r in per_round) + "). Above 1 the working tree is faster."])
    print(section)
    write_section(args.results, section + "\n", SECTION)


if __name__ == "__main__":
    main()
