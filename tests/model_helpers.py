"""Model helpers for tests: scoring an exported run with plain transformers."""

import torch

from data.loader import ResumableLoader, eval_plan
from data.prepared import open_split
from orchestrator.checkpoint import read_marker
from orchestrator.config import load_config
from orchestrator.runs import read_run_info


def exported_val_loss(home, result, tmp_path, auto_class=None) -> float:
    """Export the run, load it with plain transformers (`auto_class`, default AutoModelForCausalLM), and score
    the samples training evaluated on, with the objective's own collator (the same validation masks)."""
    import transformers

    from data.prepared import open_tokenizer, read_vocabulary
    from model.objectives import get_objective
    from orchestrator.config import from_dict
    from orchestrator.export import export

    out = export(result.run_dir, str(tmp_path / "hf"), load_config([f"paths.root={home}"]))
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    model = (auto_class or transformers.AutoModelForCausalLM).from_pretrained(str(out), local_files_only=True).eval()
    marker = read_marker(result.checkpoint)
    world_size, saved = marker["world_size"], from_dict(marker["config"])
    prepared = read_run_info(result.run_dir)["prepared"]
    val = open_split(prepared, "val")
    objective = get_objective(saved.objective.name)(saved.objective, read_vocabulary(prepared), saved.seed,
                                                    open_tokenizer(prepared))
    # The samples the workers' evaluate() scored: the same batch size and batch count, over all ranks; the
    # sums make the batching itself irrelevant.
    batch, n_batches = eval_plan(len(val), saved.trainer.micro_batch_size, saved.trainer.eval_batches, world_size)
    loader = ResumableLoader(val, batch * world_size, 0, 1, saved.seed, shuffle=False)
    sums = {}
    with torch.no_grad():
        for _ in range(n_batches):
            for key, value in objective.eval_sums(model, objective.collate(loader.next_batch(), train=False)).items():
                sums[key] = sums.get(key, 0.0) + float(value)
    return objective.metrics(sums)["loss"]


def check_loss_and_eval(objective, model, batch) -> tuple[dict, dict]:
    """The training loss is a finite scalar with a gradient, and the metrics computed from the validation
    sums of the same batch give the model's own loss. Returns (metrics, sums)."""
    loss = objective.loss(model, batch)
    assert loss.dim() == 0 and torch.isfinite(loss) and loss.requires_grad
    loss.backward()
    model.eval()
    with torch.no_grad():
        expected = model(**batch).loss.item()
        sums = objective.eval_sums(model, batch)
    assert all(v.dtype == torch.float64 and v.dim() == 0 for v in sums.values())
    metrics = objective.metrics({k: v.item() for k, v in sums.items()})
    assert abs(metrics["loss"] - expected) < 1e-5, (metrics["loss"], expected)
    return metrics, sums
