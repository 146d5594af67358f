"""Consolidate a checkpoint's ZeRO shards (any stage) into a Hugging Face model directory, and sample."""

import json
import os
import sys
import tempfile
from pathlib import Path

import fsspec
import torch

from common.errors import LmforgeError
from data.tokenizer import load_tokenizer
from model.build import build_model, embedding_rows
from model.objectives import get_objective
from orchestrator import checkpoint, runs
from orchestrator.config import from_dict
from orchestrator.quiet import muted
from orchestrator.schema import LmforgeConfig


def load_trained(target: str, cfg: LmforgeConfig, best: bool = False):
    """(model, tokenizer, marker) for a run dir, checkpoint dir or MLflow run id; weights in fp32. With
    `best`, the run's best checkpoint by its monitored metric (orchestrator.selection) instead of its newest.
    The marker also holds "uri" (the checkpoint read) and "run" (the run's info file, when there is one)."""
    if os.environ.get("LMFORGE_VERBOSE") != "1":
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    found = runs.resolve(target, cfg, checksums=cfg.checkpoint.verify)
    for uri, why in found.rejected:  # export only reads: the run's next training start removes them
        print(f"lmforge: {checkpoint.skipped_line(uri, why)}", file=sys.stderr)
    ckpt = found.checkpoint
    if best:
        from orchestrator.selection import best_checkpoint

        ckpt, _ = best_checkpoint(found.run_dir, cfg.checkpoint.verify)
    if ckpt is None:
        raise LmforgeError(f"{target} has no complete checkpoint yet")
    with tempfile.TemporaryDirectory(prefix="lmforge-export-") as tmp:
        local = _local_copy(ckpt, Path(tmp))
        marker = checkpoint.read_marker(str(local))
        saved = from_dict(marker["config"])
        # A run on bare token files has none; the weights themselves say the vocabulary size.
        tokenizer = load_tokenizer(local / "tokenizer") if (local / "tokenizer").is_dir() else None
        state = consolidated_state_dict(local, saved.hardware.zero_stage)
        ids = (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) if tokenizer else ()
        objective = get_objective(saved.objective.name)
        # The structure only: the weights come from the checkpoint, not from model.pretrained's files.
        model = build_model(saved.model, embedding_rows(state), saved.seed, objective.head, *ids, load_weights=False,
                            head_config=objective.head_config(saved.objective, marker.get("labels", ())))
    load_weights(model, state, f"checkpoint {ckpt} does not match model {saved.model.name}")
    model.tie_weights()
    model.config.use_cache = True
    info = runs.read_run_info(found.run_dir) or {}
    run = {k: info.get(k) for k in ("run_name", "mlflow_run_id", "prepared")} | {"run_dir": found.run_dir}
    return model.eval(), tokenizer, marker | {"uri": ckpt, "run": run}


# Buffers HF registers without saving them, recomputed at load: nothing a checkpoint needs to hold.
NOT_TRAINED = ("position_ids", "token_type_ids")


def load_weights(model, state: dict, mismatch: str) -> None:
    """Load strictly, but for weights the model ties to others: an untied head missing from the checkpoint
    would otherwise stay randomly initialised and export a model that only looks right."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or []) if model.config.tie_word_embeddings else set()
    missing = [k for k in missing if k not in tied and not k.endswith(NOT_TRAINED)]
    if unexpected or missing:
        raise LmforgeError(f"{mismatch}: missing {missing[:5]}, unexpected {unexpected[:5]}")


def consolidated_state_dict(local: Path, zero_stage: int) -> dict[str, torch.Tensor]:
    checkpoint.check_safe_to_load(local)
    if zero_stage == 0:
        # Without ZeRO, rank 0's model file holds the full module state.
        states = torch.load(local / checkpoint.DS_TAG / "mp_rank_00_model_states.pt", map_location="cpu",
                            weights_only=True)
        return {k: v.float() for k, v in states["module"].items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with muted():
        return get_fp32_state_dict_from_zero_checkpoint(str(local), tag=checkpoint.DS_TAG)


def export(target: str, out: str, cfg: LmforgeConfig, best: bool = False) -> Path:
    model, tokenizer, marker = load_trained(target, cfg, best)
    out_dir = Path(out).expanduser().resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out_dir))
    saved = from_dict(marker["config"])
    if saved.objective.name == "contrastive" and tokenizer is not None:  # also a sentence-transformers model
        from model.sentence import save_sentence_transformer

        save_sentence_transformer(out_dir, saved.objective.pooling, saved.data.seq_len)
    # What lmforge eval / predict need to use the export as the run would (its task and settings), and the
    # lineage a fine-tuning run started from it records.
    lineage = {k: marker["run"][k] for k in ("run_name", "mlflow_run_id", "run_dir")}
    origin = {"step": marker["step"], "metrics": marker["metrics"], "checkpoint": marker["uri"], **lineage,
              "objective": marker["config"]["objective"], "data": {"seq_len": saved.data.seq_len},
              "labels": marker.get("labels", [])}
    (out_dir / EXPORT_INFO).write_text(json.dumps(origin, indent=1))
    return out_dir


EXPORT_INFO = "lmforge_export.json"


def pretrained_from_run(target: str, cfg: LmforgeConfig) -> Path:
    """model.pretrained= an lmforge run directory, checkpoint directory or MLflow run id: its checkpoint
    exported once to <paths.root>/pretrained/<run>-step<N> (reused after), an HF directory to start from."""
    try:
        found = runs.resolve(target, cfg, checksums=cfg.checkpoint.verify)
    except LmforgeError as e:
        raise LmforgeError(f"model.pretrained={target} is not a Hugging Face model directory (no config.json), "
                           f"nor an lmforge run, checkpoint or MLflow run id ({e})") from None
    if found.checkpoint is None:
        raise LmforgeError(f"model.pretrained={target} has no complete checkpoint yet")
    step = checkpoint.read_marker(found.checkpoint)["step"]
    out = Path(cfg.paths.root) / "pretrained" / f"{found.run_dir.rstrip('/').rsplit('/', 1)[-1]}-step{step}"
    if not (out / EXPORT_INFO).is_file():
        tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
        export(found.checkpoint, str(tmp), cfg)
        tmp.rename(out)  # a finished export or none: an interrupted one is never mistaken for it
    return out


def generate(target: str, prompt: str, cfg: LmforgeConfig, max_new_tokens: int = 64,
             temperature: float = 0.8, top_k: int = 50, seed: int = 0) -> str:
    model, tokenizer, _ = load_trained(target, cfg)
    if tokenizer is None:
        raise LmforgeError(f"{target} has no tokenizer to turn the prompt into ids (trained on token files "
                           f"prepared without one); prepare with data.tokenizer.kind=pretrained and "
                           f"data.tokenizer.path=<the tokenizer that made them>")
    if not model.can_generate():
        raise LmforgeError(f"{target} is a {type(model).__name__}, which does not generate text; `lmforge generate` "
                           f"works for decoders (objective=clm) and encoder-decoders (objective=span_corruption)")
    # Encoders' tokenizers wrap text in their special tokens; decoders continue the prompt as written.
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=model.config.is_encoder_decoder)
    inputs.pop("token_type_ids", None)
    torch.manual_seed(seed)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=temperature > 0,
                                temperature=temperature or None, top_k=top_k,
                                pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                                else tokenizer.eos_token_id)
    return tokenizer.decode(output[0], skip_special_tokens=True)


def _local_copy(uri: str, tmp: Path) -> Path:
    fs, path = fsspec.core.url_to_fs(uri)
    if "file" in fs.protocol:  # a str or a tuple of names, e.g. ("file", "local")
        return Path(path)
    fs.get(path, str(tmp / "checkpoint"), recursive=True)
    return tmp / "checkpoint"
