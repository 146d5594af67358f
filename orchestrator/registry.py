"""The final model of a successful run: logged into its MLflow run and registered with its lineage."""

import contextlib
import hashlib
import json
import logging
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from common.errors import LmforgeError
from orchestrator.redact import redact_value
from orchestrator.schema import LmforgeConfig

log = logging.getLogger("lmforge.registry")

# The transformers pipeline each objective's model serves, so mlflow.pyfunc predict() works on it.
# Transformers 5 dropped the question-answering, text2text-generation and summarization pipelines, and no
# pipeline reads BertForPreTraining's two heads: extractive_qa, seq2seq, span_corruption and mlm_nsp are
# logged as their Hugging Face files instead (see log_files). contrastive has its own flavor.
PIPELINES = {"clm": "text-generation", "dialogue": "text-generation", "seq_cls": "text-classification",
             "token_cls": "token-classification", "mlm": "fill-mask"}
# How a pipeline is called at predict(), saved with the model. Token classification: a word's label is its
# first sub-word's, as token_cls trains it; "O" words are kept, because MLflow 3.17's pyfunc fails
# (IndexError) on a sentence in which the pipeline finds no entity at all.
PIPELINE_OPTIONS = {"token-classification": {"aggregation_strategy": "first", "ignore_labels": []}}
# What predict() generates unless the caller passes params={"max_new_tokens": n}; the pipeline's own default
# (max_length=20 including the prompt) silently cuts generation short.
MAX_NEW_TOKENS = 32
ARTIFACT_NAME = "model"


@dataclass
class ModelRecord:
    """Where the run's final model went."""
    model_uri: str  # models:/m-... (an MLflow model) or runs:/<run id>/model (Hugging Face files)
    flavor: str  # transformers, sentence_transformers, or files
    checkpoint: str
    step: int
    name: str | None = None  # the registered model; None with tracking.register=false
    version: str | None = None

    def where(self) -> str:
        if self.version is not None:
            return f"registered {self.name} version {self.version} ({self.flavor}, step {self.step})"
        return f"logged model in run as {self.model_uri} ({self.flavor}, step {self.step})"


def register_final_model(cfg: LmforgeConfig, mlflow_run_id: str | None, run_dir: str, checkpoint_uri: str | None,
                         metrics: dict) -> ModelRecord | None:
    """Log the run's final model into its MLflow run and register it (unless tracking.register=false).

    The launcher calls this after a successful run and before it marks the MLflow run FINISHED; the run's
    status is left as it is. It never raises: the run trained well, and a registry problem must not fail
    it, so any error becomes one warning line. With tracking.backend=none, or no checkpoint, it does nothing.
    """
    if cfg.tracking.backend == "none" or not mlflow_run_id or not checkpoint_uri:
        return None
    from orchestrator.progress import say

    try:
        record = log_final_model(cfg, mlflow_run_id, run_dir, checkpoint_uri, metrics)
    except Exception as error:
        from orchestrator.tracking import tracking_uri

        message = str(error).splitlines()[0] if str(error) else ""
        log.warning("could not log the final model of MLflow run %s at %s (%s: %s); the run itself is complete",
                    mlflow_run_id, redact_value(tracking_uri(cfg.tracking, cfg.paths.root)), type(error).__name__,
                    redact_value(message)[:300])
        return None
    say(record.where())
    return record


def log_final_model(cfg: LmforgeConfig, run_id: str, run_dir: str, checkpoint_uri: str, metrics: dict) -> ModelRecord:
    """register_final_model's work, raising on failure."""
    from orchestrator.export import EXPORT_INFO, export
    from orchestrator.tracking import connect, with_retries

    name = model_name(cfg) if cfg.tracking.register else None
    client = connect(cfg.tracking, cfg.paths.root)
    window = cfg.tracking.request_timeout_s
    # Before the export: a server that is down fails here in seconds, not after minutes of consolidating.
    run = with_retries(lambda: client.get_run(run_id), window)
    chosen, choice = final_checkpoint(cfg, run_dir, checkpoint_uri)
    with tempfile.TemporaryDirectory(prefix="lmforge-register-") as tmp, at_store(cfg), offline_hub():
        out = export(chosen, f"{tmp}/model", cfg)
        info = json.loads((out / EXPORT_INFO).read_text())
        tags = lineage_tags(cfg, run, run_dir, info, choice)
        model_uri, flavor, model_id = log_model(client, cfg, run, out, tags)
        record = ModelRecord(model_uri, flavor, info["checkpoint"], info["step"])
        if name is not None:
            with_retries(lambda: ensure_registered_model(client, name), window)
            description = lineage_description(tags, info.get("metrics") or {}, metrics)
            # Not retried: a retry after a lost reply would add a second version of the same model.
            version = client.create_model_version(name, model_uri, run_id=run_id, tags=tags,
                                                  description=description,
                                                  **({"model_id": model_id} if model_id else {}))
            record.name, record.version = name, str(version.version)
    with_retries(lambda: client.set_tag(run_id, "lmforge.registered_model", record.where()), window)
    return record


def model_name(cfg: LmforgeConfig) -> str:
    """tracking.model_name, else <model>-<objective>: a name the registry accepts (no '/' or ':')."""
    name = cfg.tracking.model_name
    if name is None:
        return re.sub(r"[/:\s]+", "-", f"{cfg.model.name}-{cfg.objective.name}").strip("-.")
    if not name.strip() or re.search(r"[/:]", name) or name.strip(".") == "":
        raise LmforgeError(f"tracking.model_name={name!r} is not a registered model name; expected a non-empty "
                           "name without '/' or ':'")
    return name


def ensure_registered_model(client, name: str) -> None:
    """Create the registered model on its first version; later runs add versions to it."""
    try:
        client.create_registered_model(name, description="lmforge models; each version's description holds "
                                                         "its lineage (run, checkpoint, parent, data, metrics).")
    except Exception as error:
        if getattr(error, "error_code", None) != "RESOURCE_ALREADY_EXISTS":
            raise


def keeps_best(cfg: LmforgeConfig) -> bool:
    """checkpoint.keep_best as the worker resolves it: null means on for fine-tuning tasks only."""
    from model.objectives import get_objective
    from model.tasks import is_task

    if cfg.checkpoint.keep_best is not None:
        return cfg.checkpoint.keep_best
    return is_task(get_objective(cfg.objective.name))


def final_checkpoint(cfg: LmforgeConfig, run_dir: str, checkpoint_uri: str) -> tuple[str, str]:
    """(checkpoint, why it was chosen): the best one by trainer.monitor when the run kept it, else the last."""
    if keeps_best(cfg):
        from orchestrator.selection import best_checkpoint

        try:
            uri, state = best_checkpoint(run_dir, cfg.checkpoint.verify)
            return uri, f"best by {state['metric']} ({state['best']:.4g})"
        except LmforgeError:  # no evaluation ran, or the best was pruned: the final weights are what there is
            pass
    return checkpoint_uri, "final"


def lineage_tags(cfg: LmforgeConfig, run, run_dir: str, info: dict, choice: str) -> dict[str, str]:
    """Where the model came from: its kind, parent, data and checkpoint, and the checkpoint's metrics."""
    from model.objectives import get_objective
    from model.tasks import is_task
    from orchestrator.launcher import pretrained_tags
    from orchestrator.runs import read_run_info

    parent = pretrained_tags(cfg)
    tags = {"lmforge.kind": "fine-tuning" if is_task(get_objective(cfg.objective.name)) else "pretraining",
            "lmforge.objective": cfg.objective.name, "lmforge.model": cfg.model.name,
            "lmforge.run_id": run.info.run_id, "lmforge.run_name": run.info.run_name or "",
            "lmforge.run_dir": run_dir, "lmforge.checkpoint": info["checkpoint"], "lmforge.step": str(info["step"]),
            "lmforge.checkpoint_choice": choice,
            "lmforge.parent": parent.get("lmforge.parent_dir", "none: trained from scratch")} | parent
    prepared = (read_run_info(run_dir) or {}).get("prepared") or run.data.tags.get("lmforge.prepared_data")
    if prepared:
        tags |= data_tags(prepared)
    for key, value in (info.get("metrics") or {}).items():
        if isinstance(value, int | float):
            tags[f"metric.{key}"] = f"{value:.6g}"
    from orchestrator.tracking import redact_tags

    return redact_tags(tags)


def data_tags(prepared: str) -> dict[str, str]:
    """The prepared data's identity: its directory's key (a hash of the data config and inputs) and the
    SHA-256 of its manifest, which holds every shard's checksum and so pins the exact samples."""
    from data.prepared import MANIFEST

    tags = {"lmforge.data": Path(prepared).name}
    manifest = Path(prepared) / MANIFEST
    if manifest.is_file():
        tags["lmforge.data_manifest_sha256"] = hashlib.sha256(manifest.read_bytes()).hexdigest()
    return tags


def lineage_description(tags: dict[str, str], checkpoint_metrics: dict, final_metrics: dict) -> str:
    """The model version's markdown description: the lineage as a table, then the metrics."""
    parent = tags["lmforge.parent"]
    if tags.get("lmforge.parent_run_id"):
        parent += f" (MLflow run `{tags['lmforge.parent_run_id']}`, checkpoint `{tags.get('lmforge.parent_checkpoint')}`)"
    rows = [("kind", tags["lmforge.kind"]), ("objective", tags["lmforge.objective"]), ("model", tags["lmforge.model"]),
            ("trained in", f"run `{tags['lmforge.run_name']}` (MLflow run `{tags['lmforge.run_id']}`), "
                           f"`{tags['lmforge.run_dir']}`"),
            ("checkpoint", f"step {tags['lmforge.step']}, {tags['lmforge.checkpoint_choice']}: "
                           f"`{tags['lmforge.checkpoint']}`"),
            ("parent", parent),
            ("data", f"`{tags.get('lmforge.data', 'unknown')}`, manifest sha256 "
                     f"`{tags.get('lmforge.data_manifest_sha256', 'unknown')}`")]
    lines = [f"lmforge {tags['lmforge.kind']} model, {tags['lmforge.objective']} on {tags['lmforge.model']}.", "",
             "| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows), ""]
    lines += metrics_table("Metrics of this checkpoint", checkpoint_metrics)
    if final_metrics and tags["lmforge.checkpoint_choice"] != "final":
        lines += metrics_table("Final metrics of the run", final_metrics)
    return "\n".join(lines)


def metrics_table(title: str, metrics: dict) -> list[str]:
    numbers = {k: v for k, v in sorted(metrics.items()) if isinstance(v, int | float)}
    if not numbers:
        return []
    return [f"**{title}**", "", "| metric | value |", "|---|---|",
            *(f"| {k} | {v:.6g} |" for k, v in numbers.items()), ""]


@contextlib.contextmanager
def offline_hub():
    """HF_HUB_OFFLINE=1 for the duration, restored after: MLflow looks the model up on the hub (its card,
    licence, commit) by its directory name, which is no hub repository."""
    before = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = before


def log_model(client, cfg: LmforgeConfig, run, out: Path, tags: dict[str, str]) -> tuple[str, str, str | None]:
    """Log the exported directory `out` into the run in the form its objective serves best; returns (model
    URI, flavor, logged model id)."""
    task = PIPELINES.get(cfg.objective.name)
    has_tokenizer = (out / "tokenizer_config.json").is_file()
    if task and has_tokenizer:
        return log_pipeline(client, cfg, run, out, task, tags)
    if cfg.objective.name == "contrastive" and (out / "modules.json").is_file():
        return log_sentence_transformer(client, cfg, run, out, tags)
    return log_files(client, cfg, run, out)


def at_store(cfg: LmforgeConfig):
    """MLflow's process-global tracking URI pointed at the run's store until the block ends: log_model reads
    it, and so does a local (SQLite) registry when it resolves a models:/ source. lmforge's own calls name
    their store, so nothing else in the process depends on the global."""
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    from orchestrator.tracking import tracking_uri

    return _use_tracking_uri(tracking_uri(cfg.tracking, cfg.paths.root))


def logged_in(client, run, tags: dict[str, str], flavor: str):
    """An MLflow 3 logged model in the run's experiment, linked to the run. Made here because MLflow's
    log_model would put it in the process's active experiment (the Default one, whose artifacts land in
    ./mlruns of the working directory), not the run's."""
    return client.create_logged_model(run.info.experiment_id, name=ARTIFACT_NAME, source_run_id=run.info.run_id,
                                      tags=tags | {"lmforge.flavor": flavor})


def requirements(*packages: str) -> list[str]:
    """Pinned to what trained the model. Given explicitly, MLflow skips inferring them, which loads the model
    again in a subprocess: seconds of CPU at the end of every run."""
    from importlib.metadata import version

    return [f"{p}=={version(p)}" for p in packages]


def log_pipeline(client, cfg: LmforgeConfig, run, out: Path, task: str, tags: dict[str, str]):
    import mlflow
    import transformers

    config = transformers.AutoConfig.from_pretrained(out)
    # The class the export saved (a task head, a causal LM), by name: an Auto class would pick by model type.
    model = getattr(transformers, config.architectures[0]).from_pretrained(out)
    # Passed loaded: given a path, MLflow 3.17 fails on transformers 5 ("'str' object has no attribute '__name__'").
    components = {"model": model, "tokenizer": transformers.AutoTokenizer.from_pretrained(out)}
    options = {"model_config": PIPELINE_OPTIONS[task]} if task in PIPELINE_OPTIONS else {}
    if task == "text-generation":
        from mlflow.models import infer_signature

        options = {"model_config": {"max_new_tokens": MAX_NEW_TOKENS},
                   "signature": infer_signature("a prompt", "a prompt and its continuation",
                                                params={"max_new_tokens": MAX_NEW_TOKENS})}
    logged = logged_in(client, run, tags, "transformers")
    info = mlflow.transformers.log_model(components, name=ARTIFACT_NAME, task=task, run_id=run.info.run_id,
                                         model_id=logged.model_id, **options,
                                         pip_requirements=requirements("transformers", "torch", "tokenizers"))
    return info.model_uri, "transformers", logged.model_id


def log_sentence_transformer(client, cfg: LmforgeConfig, run, out: Path, tags: dict[str, str]):
    """A contrastive encoder is a sentence embedder (the export wrote its pooling): MLflow's
    sentence_transformers flavor serves it, and predict() returns one embedding per sentence."""
    import mlflow
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(out), device="cpu")
    logged = logged_in(client, run, tags, "sentence_transformers")
    info = mlflow.sentence_transformers.log_model(
        model, name=ARTIFACT_NAME, run_id=run.info.run_id, model_id=logged.model_id,
        pip_requirements=requirements("sentence-transformers", "transformers", "torch"))
    return info.model_uri, "sentence_transformers", logged.model_id


def log_files(client, cfg: LmforgeConfig, run, out: Path):
    """No pipeline serves this objective's model, so it is no MLflow pyfunc model: its Hugging Face files
    (what `lmforge export` writes, with lmforge_export.json for eval/predict) go into the run as they are,
    and the registered version points at them; download them and load with from_pretrained."""
    from orchestrator.tracking import with_retries

    with_retries(lambda: client.log_artifacts(run.info.run_id, str(out), ARTIFACT_NAME),
                 cfg.tracking.request_timeout_s)
    return f"runs:/{run.info.run_id}/{ARTIFACT_NAME}", "files", None
