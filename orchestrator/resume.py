"""Planning a resume: which checkpoint it starts from, which run it writes to, and with which config.

`resume=` names a run (directory or MLflow run id) or one of its checkpoints. A run, or its newest complete
checkpoint, continues that run: same directory, same MLflow run. An older checkpoint forks a new run beside
the original (`<run>-from<step>`, or `run_name=`), with its own MLflow run that records its parent; the
original run's newer checkpoints are left untouched, because nothing a resume does should destroy work.

The saved config is the base, and only the keys given on the resuming command line change; the run keeps
its own output root (MLflow store, prepared data) unless `paths.root` is given. Two things in a
run directory are never trusted, since others may be able to write there: a `pipe:` data source (a shell
command) runs only when the command line gives it again, and a value that was redacted when saved (it held
a credential) must be given again.
"""

from dataclasses import dataclass

from omegaconf import OmegaConf

from common.errors import LmforgeError
from orchestrator import checkpoint, runs
from orchestrator.config import GROUPS, from_dict
from orchestrator.redact import REDACTED
from orchestrator.schema import LmforgeConfig

BATCH_KEYS = ("trainer.micro_batch_size", "trainer.gradient_accumulation_steps")


@dataclass
class Resume:
    cfg: LmforgeConfig  # the saved config with this command line's keys changed, validated
    run_name: str
    run_dir: str
    mlflow_run_id: str | None  # None for a fork: it gets an MLflow run of its own
    checkpoint: str | None  # None when the run has no complete checkpoint yet (it starts over)
    step: int
    parent: dict | None  # a fork's origin: run dir, checkpoint, step and MLflow run
    rejected: list[tuple[str, str]]  # the run's checkpoint directories that are not complete, and why


def plan(cfg: LmforgeConfig, overrides: list[str]) -> Resume:
    checksums = cfg.checkpoint.verify
    target = runs.resolve(cfg.resume, cfg, checksums)
    info = runs.read_run_info(target.run_dir)
    if info is None:
        raise LmforgeError(f"{target.run_dir} has no {runs.RUN_INFO}; it was not written by lmforge train")
    given = given_keys(overrides)
    step = checkpoint.read_marker(target.checkpoint)["step"] if target.checkpoint else 0
    newest = checkpoint.latest_checkpoint(target.run_dir, checksums) if target.named else target.checkpoint
    fork = target.named and checkpoint.step_of(newest or "") != step
    resumed = merge(info, cfg, overrides, given, target.run_dir)
    if not fork:
        resumed.run_name = info["run_name"]
        return Resume(resumed, info["run_name"], target.run_dir, info["mlflow_run_id"], target.checkpoint, step,
                      None, target.rejected)
    run_name = cfg.run_name if "run_name" in given and cfg.run_name else f"{info['run_name']}-from{step}"
    run_dir = f"{target.run_dir.rsplit('/', 1)[0]}/{run_name}"
    if runs.read_run_info(run_dir) is not None:
        raise LmforgeError(f"resuming from {target.checkpoint}, an older checkpoint than the run's newest, forks a "
                           f"new run, and {run_dir} already exists: pass run_name=<another name>, or "
                           f"resume={run_dir} to continue that fork")
    resumed.run_name = run_name
    parent = {"run_dir": target.run_dir, "checkpoint": target.checkpoint, "step": step,
              "mlflow_run_id": info["mlflow_run_id"]}
    return Resume(resumed, run_name, run_dir, None, target.checkpoint, step, parent, [])


def given_keys(overrides: list[str]) -> set[str]:
    return {item.lstrip("+~").split("=", 1)[0] for item in overrides}


def merge(info: dict, cfg: LmforgeConfig, overrides: list[str], given: set[str], run_dir: str) -> LmforgeConfig:
    """The saved run's config, with only the keys given on this command line changed."""
    saved = info["config"]
    merged = OmegaConf.create(saved)
    fresh = OmegaConf.structured(cfg)
    for key in sorted(given - {"paths", "paths.root"}):
        if key in GROUPS:  # hardware=gpu-8: take the whole freshly composed group
            if key != "experiment":
                merged[key] = fresh[key]
        elif key != "resume":
            OmegaConf.update(merged, key, OmegaConf.select(fresh, key), force_add=True)
    if not given & {"paths", "paths.root"}:
        # The run's own output root (its MLflow store, its prepared data), not whatever LMFORGE_HOME or the
        # working directory make of the default now.
        merged.paths = OmegaConf.create(saved["paths"])
    merged.resume = cfg.resume
    where, values = f"{run_dir}/{runs.RUN_INFO}", OmegaConf.to_container(merged)
    refuse_saved_commands(values, given, where)
    refuse_redacted(values, given, where)
    keep_global_batch(merged, saved, given)
    resumed = from_dict(OmegaConf.to_container(merged))
    resumed.validate()
    return resumed


def refuse_saved_commands(merged: dict, given: set[str], where: str) -> None:
    """A `pipe:` source runs a shell command; one read from a run directory runs only if given again."""
    if given & {"data", "data.paths"}:
        return
    pipes = [p for p in merged["data"]["paths"] if str(p).startswith("pipe:")]
    if pipes:
        raise LmforgeError(f"{where} names the data source {pipes[0]!r}, a shell command. lmforge never runs a "
                           "command read from a run directory (anyone who can write there could change it); "
                           "give the source again on the command line: data.paths=[...]")


def refuse_redacted(merged: dict, given: set[str], where: str, prefix: str = "") -> None:
    """A value saved redacted held a credential, which is never written to run files: it must be given again."""
    for key, value in merged.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            refuse_redacted(value, given, where, f"{path}.")
        elif REDACTED in str(value) and not any(path == k or path.startswith(f"{k}.") for k in given):
            raise LmforgeError(f"{path} was saved redacted in {where} because it held a credential; give it "
                               f"again on the command line ({path}=...), or through an environment variable "
                               "in your config")


def keep_global_batch(merged, saved: dict, given: set[str]) -> None:
    """On a different number of workers, keep the run's global batch by changing gradient accumulation,
    unless this command line sets the batch itself."""
    workers, before = merged.hardware.workers, saved["hardware"]["workers"]
    if workers == before or given & set(BATCH_KEYS):
        return
    tr = saved["trainer"]
    global_batch = tr["micro_batch_size"] * tr["gradient_accumulation_steps"] * before
    per_step = merged.trainer.micro_batch_size * workers
    if global_batch % per_step:
        raise LmforgeError(f"the run's global batch of {global_batch} sequences (micro_batch_size "
                           f"{tr['micro_batch_size']} x gradient_accumulation_steps "
                           f"{tr['gradient_accumulation_steps']} x {before} workers) cannot be kept on {workers} "
                           f"workers; set trainer.micro_batch_size and trainer.gradient_accumulation_steps "
                           "for the new batch explicitly")
    merged.trainer.gradient_accumulation_steps = global_batch // per_step


def data_keys_given(given: set[str]) -> list[str]:
    return sorted(k for k in given if k == "data" or k.startswith("data."))
