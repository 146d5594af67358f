"""Model helpers for tests: scoring an exported run with plain transformers."""

import numpy as np
import torch

from data.loader import eval_plan
from data.prepared import open_split
from orchestrator.checkpoint import read_marker
from orchestrator.config import load_config
from orchestrator.runs import read_run_info


def exported_val_loss(home, result, tmp_path) -> float:
    """Export the run, load it with plain transformers, and score the blocks training evaluated on."""
    from transformers import AutoModelForCausalLM

    from orchestrator.export import export

    out = export(result.run_dir, str(tmp_path / "hf"), load_config([f"paths.root={home}"]))
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True).eval()
    marker = read_marker(result.checkpoint)
    world_size, tr = marker["world_size"], marker["config"]["trainer"]
    val = open_split(read_run_info(result.run_dir)["prepared"], "val")
    # The blocks the workers' evaluate() scored: the same batch size and batch count, over all ranks.
    batch, n_batches = eval_plan(len(val), tr["micro_batch_size"], tr["eval_batches"], world_size)
    blocks = torch.stack([torch.as_tensor(np.asarray(val[i], dtype=np.int64))
                          for i in range(batch * world_size * n_batches)])
    with torch.no_grad():
        return float(np.mean([model(input_ids=b, labels=b).loss.item() for b in blocks.split(batch)]))
