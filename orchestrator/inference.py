"""Use a trained model outside training: `lmforge eval`, `predict` and `attention` on a run, a checkpoint,
an MLflow run id or an export directory, each knowing its task and labels as the run did."""

import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from common.errors import LmforgeError
from orchestrator.schema import LmforgeConfig


@dataclass
class Trained:
    model: object  # an HF model in eval mode, fp32
    tokenizer: object
    saved: LmforgeConfig  # the run's config (an export: its objective and data.seq_len over the defaults)
    labels: tuple[str, ...]
    run: dict  # run_dir, mlflow_run_id, run_name (empty for an export not written by lmforge)
    checkpoint: str | None  # the checkpoint the weights came from
    prepared: str | None  # the run's prepared data, when the target is a run that still has it

    def task(self):
        """The run's objective (a fine-tuning task for eval and predict), built as the workers built it."""
        from data.prepared import Vocabulary
        from model.objectives import get_objective

        tok = self.tokenizer
        vocab = Vocabulary(len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.mask_token_id,
                           tok.cls_token_id, tok.sep_token_id, tok.unk_token_id, tuple(tok.all_special_ids),
                           labels=self.labels)
        return get_objective(self.saved.objective.name)(self.saved.objective, vocab, self.saved.seed, tok, 1)


def load(target: str, cfg: LmforgeConfig, best: bool = False) -> Trained:
    from orchestrator.config import from_dict
    from orchestrator.export import load_trained

    path = Path(target).expanduser()
    if (path / "config.json").is_file():
        return load_export(path)
    model, tokenizer, marker = load_trained(target, cfg, best)
    if tokenizer is None:
        raise LmforgeError(f"{target} was trained on token files without a tokenizer; it cannot read text")
    run = dict(marker["run"])
    prepared = run.pop("prepared", None)
    return Trained(model, tokenizer, from_dict(marker["config"]), tuple(marker.get("labels", ())), run,
                   marker["uri"], prepared if prepared and Path(prepared).is_dir() else None)


def load_export(path: Path) -> Trained:
    """An `lmforge export` directory (its lmforge_export.json names the task), or any HF model directory."""
    from transformers import AutoConfig

    from data.tokenizer import load_tokenizer
    from model.build import model_class
    from model.config import FAMILIES, ModelConfig
    from model.objectives import get_objective
    from orchestrator.config import from_dict
    from orchestrator.export import EXPORT_INFO

    info_file = path / EXPORT_INFO
    info = json.loads(info_file.read_text()) if info_file.is_file() else {}
    if "objective" not in info:
        raise LmforgeError(f"{path} is not an lmforge export (no objective in {EXPORT_INFO}); export the run "
                           f"again with `lmforge export`")
    saved = from_dict({"objective": info["objective"], "data": info.get("data", {})})
    config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    if config.model_type not in FAMILIES:
        raise LmforgeError(f"{path} holds a {config.model_type} model; lmforge knows {', '.join(FAMILIES)}")
    cls = model_class(ModelConfig(arch=config.model_type), get_objective(saved.objective.name).head)
    model = cls.from_pretrained(str(path), local_files_only=True)
    labels = tuple(info.get("labels") or ())
    run = {k: info.get(k) for k in ("run_dir", "mlflow_run_id", "run_name")}
    return Trained(model.eval(), load_tokenizer(path), saved, labels, run, info.get("checkpoint"), None)


def evaluate(trained: Trained, cfg: LmforgeConfig, data_given: bool, batch_size: int) -> tuple[dict, dict]:
    """(metrics, report) of the trained model on the data the command line names (every record of data.paths),
    or, when it names none, on its run's own validation split."""
    import torch

    from data.finetune import read_references
    from data.prepared import open_split
    from model.tasks import is_task
    from orchestrator.evaluate import evaluate_task

    task = trained.task()
    if not is_task(type(task)):
        raise LmforgeError(f"objective={task.name} is a pretraining objective; lmforge eval scores fine-tuning "
                           f"tasks (its validation loss is in the run's metrics)")
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="lmforge-eval-") as tmp:
        if data_given:
            prepared = prepare_eval_data(trained, cfg, Path(tmp))
            source = f"{cfg.data.source}: {', '.join(cfg.data.paths)}"
        elif trained.prepared:
            prepared, source = trained.prepared, f"the run's validation split ({trained.prepared})"
        else:
            raise LmforgeError("name the data to evaluate on, e.g. data=records 'data.paths=[test.jsonl]' "
                               "(the run's own prepared data is not available)")
        store, references = open_split(prepared, "val"), read_references(prepared)
        with torch.no_grad():
            metrics = evaluate_task(trained.model, task, store, references, batch_size, "cpu")
        baseline = task.baseline(references)
        examples = len(references)
    report = {"target": trained.checkpoint or "", "task": task.name, "data": source, "examples": examples,
              "metrics": metrics, "baseline": baseline, "seconds": round(time.time() - started, 2),
              "run": trained.run}
    return metrics, report


def prepare_eval_data(trained: Trained, cfg: LmforgeConfig, out: Path) -> Path:
    """Every record of the given data, built into samples with the model's tokenizer and labels (a label the
    model does not know is bad input, named by file and line)."""
    from data.finetune import build_task_data
    from data.prepared import MANIFEST, shard_dtype

    trained.tokenizer.save_pretrained(str(out / "given-tokenizer"))
    data = cfg.data
    data.tokenizer.kind, data.tokenizer.path = "pretrained", str(out / "given-tokenizer")
    data.seq_len = trained.saved.data.seq_len
    task = type(trained.task())
    manifest = build_task_data(data, out / "data", trained.saved.seed, task, trained.saved.objective,
                               labels=list(trained.labels) if task.labelled else None, evaluate_only=True)
    manifest |= {"dtype": shard_dtype(manifest["vocab_size"]), "seq_len": data.seq_len}
    (out / "data" / MANIFEST).write_text(json.dumps(manifest))
    return out / "data"


def table(metrics: dict, baseline: dict) -> str:
    """Metrics with the baseline beside them, one per line."""
    lines = [f"{'metric':<20}{'model':>12}{'baseline':>12}"]
    for key, value in metrics.items():
        base = baseline.get(key)
        lines.append(f"{key:<20}{value:>12.4f}" + (f"{base:>12.4f}" if base is not None else ""))
    return "\n".join(lines)


def log_to_run(cfg: LmforgeConfig, run_id: str, metrics: dict, files: list[Path], artifact_path: str) -> None:
    """Eval metrics (prefixed eval/) and reports or plots, into the run they describe."""
    from orchestrator.tracking import connect

    client = connect(cfg.tracking, cfg.paths.root)
    stamp = int(time.time() * 1000)
    for key, value in metrics.items():
        client.log_metric(run_id, f"eval/{key}", float(value), timestamp=stamp)
    for path in files:
        client.log_artifact(run_id, str(path), artifact_path=artifact_path)
