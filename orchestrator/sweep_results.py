"""A finished sweep's results: the trials table (CSV and markdown), plots, the parent MLflow run's best-trial
tags and artifacts, and the best config as an `lmforge train` command."""

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from orchestrator import runs
from orchestrator.schema import LmforgeConfig
from orchestrator.sweep_space import Swept, override_value, train_command

FINISHED, STOPPED, FAILED = "finished", "stopped early", "error"


@dataclass
class Trial:
    trial_id: str
    values: dict  # the swept keys' values
    state: str  # finished, stopped early (by ASHA), error
    step: int  # the last reported trainer step
    metric: float | None  # the sweep's metric at that step
    train_loss: float | None
    run_name: str
    mlflow_run_id: str | None
    curve: list[tuple[int, float]] = field(default_factory=list)  # (step, metric) at every evaluation


@dataclass
class Summary:
    sweep_dir: str
    metric: str
    mode: str
    trials: list[Trial]
    best: Trial | None
    best_command: str | None
    files: list[Path]
    parent_run_id: str | None


def collect(cfg: LmforgeConfig, sweep, results) -> list[Trial]:
    from orchestrator.sweep import trial_run_dir

    metric, trials = cfg.sweep.metric, []
    for result in results:
        trial_id = result.metrics.get("trial_id") or Path(result.path).name
        frame = result.metrics_dataframe
        curve = []
        if frame is not None and metric in frame and "step" in frame:
            curve = [(int(s), float(v)) for s, v in zip(frame["step"], frame[metric]) if not math.isnan(v)]
        step = int(result.metrics.get("step", 0))
        state = FAILED if result.error else FINISHED if step >= cfg.trainer.max_steps else STOPPED
        info = runs.read_run_info(trial_run_dir(cfg, sweep.name, trial_id)) or {}
        trials.append(Trial(trial_id, dict(result.config), state, step, result.metrics.get(metric),
                            result.metrics.get("train/loss"), info.get("run_name", f"{sweep.name}-{trial_id}"),
                            info.get("mlflow_run_id"), curve))
    return sorted(trials, key=lambda t: t.trial_id)


def choose_best(trials: list[Trial], mode: str) -> Trial | None:
    """The best metric among trials that trained to the end (a trial stopped early may have looked better
    at an early step than finished ones at their last); among all trials without errors if none finished."""
    candidates = [t for t in trials if t.state == FINISHED and t.metric is not None] or [
        t for t in trials if t.state != FAILED and t.metric is not None]
    if not candidates:
        return None
    return (min if mode == "min" else max)(candidates, key=lambda t: t.metric)


def write_tables(trials: list[Trial], swept: list[Swept], metric: str, out: Path) -> list[Path]:
    keys = [s.key for s in swept]
    header = ["trial", "state", "step", metric, "train/loss", *keys, "run"]
    rows = [[t.trial_id, t.state, t.step, fmt(t.metric), fmt(t.train_loss),
             *(override_value(t.values.get(k)) for k in keys), t.run_name] for t in trials]
    csv_file, md_file = out / "trials.csv", out / "trials.md"
    with open(csv_file, "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    md_file.write_text("\n".join(lines) + "\n")
    return [csv_file, md_file]


def fmt(value) -> str:
    return "" if value is None else f"{value:.6g}"


def plot(trials: list[Trial], swept: list[Swept], metric: str, out: Path) -> list[Path]:
    """One PNG of the final metric against each swept key, and one of every trial's metric by step."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a cluster node
    import matplotlib.pyplot as plt

    files = []
    colors = {FINISHED: "tab:blue", STOPPED: "tab:orange", FAILED: "tab:red"}
    for s in swept:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for state, color in colors.items():
            shown = [t for t in trials if t.state == state and t.metric is not None]
            if shown:
                xs = [t.values[s.key] if s.choices is None else str(t.values[s.key]) for t in shown]
                ax.scatter(xs, [t.metric for t in shown], color=color, label=state)
        if s.log:
            ax.set_xscale("log")
        ax.set_xlabel(s.key)
        ax.set_ylabel(f"{metric} (last reported)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        files.append(out / f"{metric.replace('/', '_')}_vs_{s.key.replace('/', '_')}.png")
        fig.savefig(files[-1], dpi=100)
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    for t in trials:
        if t.curve:
            ax.plot(*zip(*t.curve), marker="o", label=f"{t.trial_id} ({t.state})")
    ax.set_xlabel("trainer step")
    ax.set_ylabel(metric)
    ax.legend(fontsize=7)
    fig.tight_layout()
    files.append(out / f"{metric.replace('/', '_')}_curves.png")
    fig.savefig(files[-1], dpi=100)
    plt.close(fig)
    return files


def close_child_runs(cfg: LmforgeConfig, trials: list[Trial]) -> None:
    """A trial that ASHA stopped was ended by Tune mid-fit, leaving its MLflow run RUNNING or FAILED: it
    stopped as the sweep meant, so it ends FINISHED, tagged with how and where it ended."""
    from orchestrator.tracking import connect, finish_run, set_tags

    if cfg.tracking.backend == "none":
        return
    client = connect(cfg.tracking, cfg.paths.root)
    for t in trials:
        if t.mlflow_run_id is None:
            continue
        set_tags(client, t.mlflow_run_id, {"lmforge.sweep_state": t.state, "lmforge.sweep_step": str(t.step)},
                 cfg.tracking.request_timeout_s)
        status = "FAILED" if t.state == FAILED else "FINISHED"
        if client.get_run(t.mlflow_run_id).info.status != status:
            finish_run(cfg.tracking, cfg.paths.root, t.mlflow_run_id, status)


def record_parent(cfg: LmforgeConfig, sweep, best: Trial | None, command: str | None, files: list[Path]) -> None:
    from orchestrator.tracking import connect, set_tags

    if cfg.tracking.backend == "none" or not sweep.parent_run_id:
        return
    client = connect(cfg.tracking, cfg.paths.root)
    if best is not None:
        set_tags(client, sweep.parent_run_id, {
            "lmforge.best_trial": best.trial_id, "lmforge.best_run": best.run_name,
            "lmforge.best_run_id": best.mlflow_run_id or "", "lmforge.best_metric": f"{cfg.sweep.metric}="
            f"{best.metric:.6g}", "lmforge.best_config": json.dumps(best.values, sort_keys=True),
            "lmforge.best_command": command}, cfg.tracking.request_timeout_s)
        client.log_metric(sweep.parent_run_id, f"best/{cfg.sweep.metric}", float(best.metric))
    for path in files:
        client.log_artifact(sweep.parent_run_id, str(path), artifact_path="sweep")


def summarize(cfg: LmforgeConfig, sweep, swept: list[Swept], results) -> Summary:
    trials = collect(cfg, sweep, results)
    best = choose_best(trials, cfg.sweep.mode)
    command = train_command(sweep.fixed, best.values) if best else None
    out = Path(sweep.sweep_dir)
    files = write_tables(trials, swept, cfg.sweep.metric, out) + plot(trials, swept, cfg.sweep.metric, out)
    close_child_runs(cfg, trials)
    record_parent(cfg, sweep, best, command, files)
    return Summary(sweep.sweep_dir, cfg.sweep.metric, cfg.sweep.mode, trials, best, command, files,
                   sweep.parent_run_id)


def summary_lines(summary: Summary) -> list[str]:
    """What `lmforge sweep` prints at the end: the table, where the results are, and the best config's
    command last."""
    counts = {state: sum(t.state == state for t in summary.trials) for state in (FINISHED, STOPPED, FAILED)}
    lines = [(summary.files[1].read_text().rstrip() if len(summary.files) > 1 else ""),
             f"trials:      {len(summary.trials)} ({', '.join(f'{n} {s}' for s, n in counts.items() if n)})",
             f"results:     {summary.sweep_dir} (trials.csv, trials.md, plots)"]
    if summary.parent_run_id:
        lines.append(f"mlflow run:  {summary.parent_run_id} (parent; one child run per trial)")
    if summary.best is None:
        lines.append("best:        no trial reported the metric")
        return lines
    b = summary.best
    lines += [f"best:        trial {b.trial_id} ({summary.metric}={b.metric:.6g} at step {b.step}; run {b.run_name})",
              f"rerun best:  {summary.best_command}"]
    return lines
