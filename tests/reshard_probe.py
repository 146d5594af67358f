"""Run as a script: `python tests/reshard_probe.py CHECKPOINT PREPARED`.

Loads a ZeRO-1/2 checkpoint written by several workers into a one-worker DeepSpeed engine exactly as a
resume on fewer workers does (universal conversion, re-partitioned load), then compares the engine's fp32
master weights and Adam moments, parameter by parameter, with the checkpoint's own shards consolidated here
independently of DeepSpeed's conversion. Prints one JSON line: the largest absolute difference per state.
It runs in its own process because it needs a torch.distributed group of one.
"""

import json
import os
import socket
import sys
from pathlib import Path

import torch
import torch.distributed as dist

STATES = ("fp32", "exp_avg", "exp_avg_sq")


def consolidated(ds_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Per parameter name, its fp32 weight and Adam moments: every rank's flat partition of each parameter
    group, concatenated in rank order, cut at the parameter shapes the model file records."""
    from orchestrator.checkpoint import deepspeed_safe_globals

    with torch.serialization.safe_globals(deepspeed_safe_globals()):
        model_states = torch.load(ds_dir / "mp_rank_00_model_states.pt", weights_only=True)
        ranks = sorted(ds_dir.glob("zero_pp_rank_*_mp_rank_00_optim_states.pt"),
                       key=lambda p: int(p.name.split("_")[3]))
        optims = [torch.load(p, weights_only=True)["optimizer_state_dict"] for p in ranks]
    paddings = optims[0].get("param_alignment_paddings")
    out: dict[str, dict[str, torch.Tensor]] = {}
    for group, shapes in enumerate(model_states["param_shapes"]):
        flats = {"fp32": torch.cat([o["single_partition_of_fp32_groups"][group] for o in optims])}
        for key in ("exp_avg", "exp_avg_sq"):
            flats[key] = torch.cat([o["base_optimizer_state"]["state"][group][key] for o in optims])
        offset = 0
        for index, (name, shape) in enumerate(shapes.items()):
            numel = shape.numel()
            out[name] = {key: flat[offset:offset + numel].view(shape) for key, flat in flats.items()}
            offset += numel + (paddings[group][index] if paddings else 0)
    return out


def main(ckpt: str, prepared: str) -> None:
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    from data.prepared import read_vocabulary
    from model.build import build_model
    from orchestrator import checkpoint
    from orchestrator.config import from_dict
    from orchestrator.engine import build_engine
    from orchestrator.worker import accumulation_steps

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    cfg = from_dict(checkpoint.read_marker(ckpt)["config"])
    cfg.trainer.gradient_accumulation_steps = accumulation_steps(cfg, 1)
    vocab = read_vocabulary(prepared)
    model = build_model(cfg.model, vocab.size, cfg.seed, bos_id=vocab.bos_id, eos_id=vocab.eos_id, pad_id=vocab.pad_id)
    engine = build_engine(model, cfg, 1, load_universal=True)
    checkpoint.restore(engine, Path(ckpt), rank=0, reshard=True)
    reference = consolidated(Path(ckpt) / checkpoint.DS_TAG)
    worst = dict.fromkeys(STATES, 0.0)
    names = dict(engine.module.named_parameters())
    for name, param in names.items():
        loaded = {"fp32": safe_get_full_fp32_param(param),
                  "exp_avg": safe_get_full_optimizer_state(param, "exp_avg"),
                  "exp_avg_sq": safe_get_full_optimizer_state(param, "exp_avg_sq")}
        for key in STATES:
            worst[key] = max(worst[key], float((loaded[key].detach() - reference[name][key]).abs().max()))
    print(json.dumps({"params": len(names), "max_abs_diff": worst,
                      "moments_nonzero": bool(reference[next(iter(names))]["exp_avg_sq"].abs().sum() > 0)}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
