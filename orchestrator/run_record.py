"""What an MLflow run shows besides params and metrics: the tags naming the job, the description that says how
to reproduce it, the config and overrides files, and the loss curve."""

import json
import os
import shlex
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from orchestrator.redact import REDACTED, is_secret_key, redact_config, redact_value

NOTE_TAG = "mlflow.note.content"  # the run's description in the MLflow UI (markdown)
# MLflow 3's UI opens an experiment on the GenAI traces view unless told it holds model training. Earlier 3.x
# UIs read that from the experiment's kind tag ("custom_model_development", "Machine learning" in the UI).
# 3.17's UI ignores the tag: a "GenAI | Model training" switch decides, from the URL's workflowType parameter,
# else the browser's last choice (GenAI until the user switches). So lmforge sets the tag and also puts the
# parameter on every UI link it writes (ui_url, run_link).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
RUNS_VIEW = "workflowType=machine_learning"
CONFIG_FILE = "config.yaml"
OVERRIDES_FILE = "overrides.txt"
MANIFEST_FILE = "data_manifest.json"
LOSS_CURVE_FILE = "loss_curve.png"
CURVE_KEYS = ("train/loss", "val/loss")
CURVE_SIZE_PX = (960, 540)
CURVE_DPI = 100
PACKAGE_DIR = Path(__file__).resolve().parent


@dataclass
class RunRecord:
    """What the driver knows about a job that the run should show, beyond its params and tags."""
    command: str  # the `lmforge train ...` line that reproduces the run, credentials masked
    files: dict[str, str] = field(default_factory=dict)  # artifact file -> text
    parent_run_id: str | None = None  # the MLflow run this one continues from (fine-tuning, a fork)
    changes: dict[str, tuple[str, str]] = field(default_factory=dict)  # a resume's key -> (old, new)
    step: int = 0  # the step a resume continues from


# --- values as users read them -------------------------------------------------------------------------------
def yaml_scalar(value) -> str:
    """A config value as the YAML users write: null, true, 0.001, [a, b]; never Python's None or True."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple | Mapping):
        return json.dumps(value, default=str)  # JSON is YAML's flow style, and keeps null/true inside too
    return str(value)


def truncate(text: str, limit: int, marker: str) -> str:
    """`text` cut to `limit` characters, ending in `marker` when anything was cut."""
    return text if len(text) <= limit else text[:limit - len(marker)] + marker


# --- tags ----------------------------------------------------------------------------------------------------
def job_tags(cfg, run_dir: str, prepared: str) -> dict[str, str]:
    """The tags every lmforge run carries: what trained, on what, from which code, and where its files are."""
    tags = {"lmforge.objective": cfg.objective.name, "lmforge.model": cfg.model.name,
            "lmforge.architecture": architecture(cfg.model), "lmforge.hardware": cfg.hardware.name,
            "lmforge.run_dir": run_dir, "lmforge.prepared_data": prepared}
    if version := lmforge_version():
        tags["lmforge.version"] = version
    tags |= git_state(PACKAGE_DIR)
    if job_id := ray_job_id():
        tags["lmforge.ray_job_id"] = job_id
    return tags


def architecture(model_cfg) -> str:
    """The model's architecture: a pretrained model's own config.json decides it over model.arch."""
    config_file = Path(model_cfg.pretrained or "") / "config.json"
    if model_cfg.pretrained and config_file.is_file():
        try:
            return json.loads(config_file.read_text()).get("model_type") or model_cfg.arch
        except ValueError:
            pass
    return model_cfg.arch


def lmforge_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lmforge")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return None


def git_state(path: Path) -> dict[str, str]:
    """lmforge.git_commit and lmforge.git_dirty (tracked files changed) for code run from a git checkout;
    nothing when there is no git or no checkout."""
    try:
        commit = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10)
        if commit.returncode != 0:
            return {}
        status = subprocess.run(["git", "-C", str(path), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return {}
    tags = {"lmforge.git_commit": commit.stdout.strip()}
    if status.returncode == 0:
        tags["lmforge.git_dirty"] = "true" if status.stdout.strip() else "false"
    return tags


def ray_job_id() -> str | None:
    """The Ray job this driver runs as: the submission id `ray job submit` gave it (what `ray job status`
    takes), else the job id Ray put in RAY_JOB_ID; None for a driver started by hand."""
    config = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")  # set by Ray's job supervisor for the entrypoint
    if config:
        try:
            if submission := json.loads(config).get("metadata", {}).get("job_submission_id"):
                return submission
        except (ValueError, AttributeError):
            pass
    return os.environ.get("RAY_JOB_ID") or None


# --- description ---------------------------------------------------------------------------------------------
def command_line(overrides: list[str]) -> str:
    """`lmforge train <overrides>` as typed, shell-quoted, with credentials masked."""
    return shlex.join(["lmforge", "train", *(redact_override(item) for item in overrides)])


def redact_override(item: str) -> str:
    key, sep, value = item.partition("=")
    if sep and is_secret_key(key.lstrip("+~")) and value not in ("", "null"):
        return f"{key}={REDACTED}"
    return redact_value(item)


def run_link(experiment_id: str | None, run_id: str) -> str:
    """A link to a run that works inside the MLflow UI (its routes are hash fragments); without the
    experiment, MLflow's run route finds it."""
    route = f"#/experiments/{experiment_id}/runs/{run_id}" if experiment_id else f"#/runs/{run_id}"
    return f"{route}?{RUNS_VIEW}"


def ui_url(base_url: str, experiment_id: str | None = None) -> str:
    """The MLflow UI at `base_url` opened on an experiment's runs table (or on the experiment list), in the
    model-training view rather than the GenAI one. Only a link straight to the experiment keeps that view:
    3.17's experiment list drops the parameter from the links it shows."""
    route = f"#/experiments/{experiment_id}/runs" if experiment_id else "#/experiments"
    return f"{base_url.rstrip('/')}/{route}?{RUNS_VIEW}"


def description(record: RunRecord, parent_experiment_id: str | None = None) -> str:
    lines = ["Reproduce this run:", "", "```", record.command, "```"]
    if record.parent_run_id:
        lines += ["", f"Continues from the run [{record.parent_run_id}]"
                      f"({run_link(parent_experiment_id, record.parent_run_id)})."]
    return "\n".join(lines)


def resume_section(record: RunRecord) -> str:
    """A description section for one resume: its command line and the keys it changed, old and new."""
    when = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    lines = ["", f"**Resumed** {when}" + (f" from step {record.step}" if record.step else "") + ":", "", "```",
             record.command, "```"]
    if record.changes:
        lines += ["", "Keys this resume changed (the params above show the values the run started with):", "",
                  "| key | was | now |", "|---|---|---|"]
        lines += [f"| {key} | `{old}` | `{new}` |" for key, (old, new) in sorted(record.changes.items())]
    return "\n".join(lines)


# --- files ---------------------------------------------------------------------------------------------------
def config_yaml(config: Mapping) -> str:
    """The resolved config as YAML, masked like the params."""
    import yaml

    return yaml.safe_dump(redact_config(config), sort_keys=False, default_flow_style=False)


def overrides_text(overrides: list[str]) -> str:
    return "".join(f"{redact_override(item)}\n" for item in overrides)


def manifest_text(prepared: str) -> str | None:
    """The prepared data's manifest (data.prepared.MANIFEST), masked; None when it cannot be read."""
    from data.prepared import MANIFEST

    try:
        manifest = json.loads((Path(prepared) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    # Its "key" names the prepared corpus; anywhere else a key named so would be a credential.
    return json.dumps({k: v if k == "key" else redact_config({k: v})[k] for k, v in manifest.items()}, indent=1)


def flat_changes(before: Mapping, after: Mapping, ignore: tuple[str, ...] = ()) -> dict[str, tuple[str, str]]:
    """Keys whose value differs between two nested configs, as YAML text (old, new)."""
    from orchestrator.tracking import flatten_params

    old, new = flatten_params(before), flatten_params(after)
    return {key: (yaml_scalar(old.get(key)), yaml_scalar(new.get(key)))
            for key in sorted(old.keys() | new.keys())
            if key not in ignore and yaml_scalar(old.get(key)) != yaml_scalar(new.get(key))}


# --- loss curve ----------------------------------------------------------------------------------------------
def render_loss_curve(history: Mapping[str, Mapping[int, float]], path: str, title: str = "") -> bool:
    """Draw train and validation loss against step into a PNG of CURVE_SIZE_PX; False when there is nothing
    to draw. Uses matplotlib's Agg canvas directly: no pyplot, so no global backend or figure state, which
    makes it safe on a background thread."""
    series = {key: sorted(history[key].items()) for key in CURVE_KEYS if history.get(key)}
    if not series:
        return False
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(CURVE_SIZE_PX[0] / CURVE_DPI, CURVE_SIZE_PX[1] / CURVE_DPI), dpi=CURVE_DPI)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for key, points in series.items():
        steps, values = zip(*points)
        axes.plot(steps, values, marker="o" if len(points) < 30 else None, markersize=3, label=key)
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=CURVE_DPI)
    return True
