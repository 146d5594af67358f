"""The per-worker training loop that Ray Train runs on every rank."""

import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import ray.train
import torch
import torch.distributed as dist

from common.errors import LmforgeError
from data.loader import ResumableLoader, eval_plan
from data.prepared import open_split, open_tokenizer, read_vocabulary
from model.build import build_model
from model.objectives import get_objective
from orchestrator import checkpoint
from orchestrator.config import from_dict, to_dict
from orchestrator.credentials import apply_credentials
from orchestrator.engine import build_engine
from orchestrator.metrics import StepMeter
from orchestrator.quiet import silence_loggers
from orchestrator.redact import redact_config
from orchestrator.selection import Selection
from orchestrator.tracker import RunTracker
from orchestrator.wandb_logger import WandbLogger


@dataclass
class Job:
    """What every step of one rank's training needs, built once by train_loop."""
    cfg: object
    rank: int
    world_size: int
    engine: object
    loader: ResumableLoader
    objective: object  # a model.objectives.base.Objective: collate, loss, eval sums, metrics
    tokenizer: object  # None for token files prepared without one
    tracker: RunTracker | None  # rank 0's MLflow sender
    progress: object  # the driver's event queue, or None
    run_dir: str
    prepared: str
    data_identity: dict  # what the loader's position means; saved with it
    selection: Selection  # best checkpoint and early stopping, by a validation metric
    references: list | None = None  # a fine-tuning task's validation truth, read at its first evaluation
    wandb: WandbLogger | None = None  # rank 0's optional second logger (tracking.wandb)


def train_loop(loop_config: dict) -> None:
    startup = {"worker_started": time.time()}
    if os.environ.get("LMFORGE_VERBOSE") != "1":
        silence_loggers()
    if loop_config.get("credentials") is not None:  # a cluster joined by address: sign in as the driver does
        apply_credentials(ray.get(loop_config["credentials"]))
    cfg = from_dict(loop_config["config"])
    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    trace_start(rank)
    tr = cfg.trainer
    # The global batch is what the user configured for hardware.workers; on fewer or more workers (a resume
    # elsewhere, an elastic run) gradient accumulation changes to keep it.
    tr.gradient_accumulation_steps = accumulation_steps(cfg, world_size)
    checkpoint.remove_orphaned_staging()
    progress, prepared = loop_config.get("progress"), loop_config["prepared"]

    vocab, tokenizer, objective_class = read_vocabulary(prepared), open_tokenizer(prepared), get_objective(
        cfg.objective.name)
    model = build_model(cfg.model, vocab.size, cfg.seed, objective_class.head, bos_id=vocab.bos_id,
                        eos_id=vocab.eos_id, pad_id=vocab.pad_id,
                        head_config=objective_class.head_config(cfg.objective, vocab.labels))
    num_params = sum(p.numel() for p in model.parameters())
    startup["model_built"] = time.time()
    resume_from, saved_world_size = choose_checkpoint(loop_config, cfg, rank, progress)
    reshard = resume_from is not None and saved_world_size != world_size
    engine = build_engine(model, cfg, world_size, load_universal=reshard)
    startup["deepspeed_ready"] = time.time()
    loader = ResumableLoader(open_split(prepared, "train"), tr.micro_batch_size, rank, world_size, cfg.seed,
                             cfg.data.shuffle)
    objective = objective_class(cfg.objective, vocab, cfg.seed, tokenizer, world_size)
    job = Job(cfg, rank, world_size, engine, loader, objective, tokenizer, None, progress, loop_config["run_dir"],
              prepared, checkpoint.data_identity(prepared, cfg.data.shuffle), Selection.for_run(cfg, objective_class))

    step = 0
    if resume_from is not None:
        with ray.train.Checkpoint(resume_from).as_directory() as local:
            restored = checkpoint.restore(engine, Path(local), rank, reshard)
        step = restored.step
        checkpoint.check_same_data(restored.loader_state, job.data_identity, resume_from)
        loader.load_state_dict(restored.loader_state)
        job.selection.load(restored.selection)
    trace_samples(loader, rank)

    job.tracker = RunTracker(cfg.tracking, cfg.paths.root, loop_config["mlflow_run_id"]) if rank == 0 else None
    if rank == 0:
        job.wandb = WandbLogger(cfg.tracking.wandb, cfg.paths.root)
        job.wandb.start(loop_config["run_dir"].rstrip("/").rsplit("/", 1)[-1], loop_config["config"],
                        run_key=loop_config["mlflow_run_id"])
    failed = True
    try:
        train_steps(job, step, num_params, startup)
        failed = False
    finally:  # the metric senders flush and close however the loop ends
        if job.tracker is not None:
            job.tracker.close()
        if job.wandb is not None:
            job.wandb.finish(exit_code=1 if failed else 0)


def train_steps(job: Job, step: int, num_params: int, startup: dict) -> None:
    cfg, engine, rank, tracker, progress = job.cfg, job.engine, job.rank, job.tracker, job.progress
    tr = cfg.trainer
    meter = StepMeter(cfg.model, job.engine.module.get_input_embeddings().num_embeddings, job.objective.head,
                      cfg.hardware.peak_flops_per_worker, job.world_size, engine.device)
    if rank == 0 and progress is not None:
        progress.put({"event": "start", "step": step, "max_steps": tr.max_steps, "num_params": num_params})
    if rank == 0 and step > 0:
        tracker.log_metrics({"checkpoint/restored_step": step}, step)

    last, first_step, diverged = {}, True, None
    while step < tr.max_steps:
        meter.start()
        loss_sum = train_step(engine, job.loader, job.objective, tr.gradient_accumulation_steps, meter)
        step += 1
        log_due = step % tr.log_every == 0 or step == tr.max_steps
        eval_due = (tr.eval_every and step % tr.eval_every == 0) or step == tr.max_steps
        save_due = step % cfg.checkpoint.every == 0 or step == tr.max_steps
        if log_due or eval_due or save_due or first_step:
            # Reading the loss waits for the device to finish the step, so only steps that report anything
            # do it: a GPU is never left idle while the host catches up. The meter stops after the read,
            # so a window's step times still add up to the device's time.
            norm = engine.get_global_grad_norm()  # None where DeepSpeed computed none
            last = {"train/loss": mean_over_ranks(loss_sum, tr.gradient_accumulation_steps),
                    "train/lr": engine.get_lr()[0], "train/grad_norm": float("nan") if norm is None else float(norm)}
            # Without a gradient norm (ZeRO-0 without clipping) a finite loss says nothing of the update just
            # applied, so a step that saves looks at the weights themselves before they reach a checkpoint.
            weights_ok = norm is not None or not save_due or weights_finite(engine)
            diverged = None if engine_skips_nonfinite(cfg) else divergence(
                last["train/loss"], norm, step, job.run_dir, weights_ok)
        meter.stop()
        if rank == 0 and progress is not None and first_step:
            progress.put({"event": "first_step", "time": time.time(), "startup": startup})
        first_step = False
        if diverged:
            stop_diverged(rank, tracker, progress, last, step, diverged, job.wandb)
            break
        if log_due:
            last |= {f"train/{k}": v for k, v in meter.read().items()}
        stop = False
        if eval_due:
            last |= evaluate_job(job)
            # The best model must exist in storage: an evaluation that improves the monitored metric saves.
            save_due |= job.selection.update(last, step) and keeps_best(cfg, job.objective)
            stop = job.selection.should_stop and step < tr.max_steps
            save_due |= stop
        if log_due or eval_due:
            publish(rank, tracker, progress, last, step, job.wandb)
        if save_due:
            save_and_report(job, step, last, evaluated=eval_due, stopped_early=stop)
        elif eval_due:
            # Every evaluation reaches Ray, so a sweep's scheduler (ASHA) can stop a trailing trial between
            # checkpoints; a step that saves reports once, with its checkpoint. Every rank reports.
            ray.train.report({"step": step, **last})
        if stop:
            if rank == 0:
                notify(progress, job.selection.stop_message(step))
            break


def choose_checkpoint(loop_config: dict, cfg, rank: int, progress) -> tuple[str | None, int | None]:
    """(checkpoint to start from, the world size that wrote it). Rank 0 lists storage and decides; the other
    ranks follow, so no two ranks can see different listings of an object store and disagree."""
    choice = [None, None]
    if rank == 0:
        choice[0] = restore_source(loop_config, cfg, progress)
        choice[1] = checkpoint.read_marker(choice[0])["world_size"] if choice[0] else None
    dist.broadcast_object_list(choice, src=0)
    return choice[0], choice[1]


def restore_source(loop_config: dict, cfg, progress) -> str | None:
    """The run's newest complete checkpoint (after a worker failure, or when resuming the run itself), else
    the one `resume=` named. Directories that are not complete checkpoints (a save interrupted by this
    failure) are removed, saying why, so that step is later saved again into an empty directory."""
    found = checkpoint.scan(loop_config["run_dir"], checksums=cfg.checkpoint.verify)
    checkpoint.remove_rejected(found, lambda line: notify(progress, line))
    latest, explicit = found.latest(), loop_config.get("resume_from")
    if latest is None or (explicit and checkpoint.step_of(explicit) > checkpoint.step_of(latest)):
        return explicit
    return latest


def accumulation_steps(cfg, world_size: int) -> int:
    """Gradient accumulation that keeps the configured global batch on `world_size` workers."""
    tr = cfg.trainer
    global_batch = tr.micro_batch_size * tr.gradient_accumulation_steps * cfg.hardware.workers
    if global_batch % (tr.micro_batch_size * world_size):
        raise LmforgeError(f"the global batch of {global_batch} sequences (trainer.micro_batch_size="
                           f"{tr.micro_batch_size} x trainer.gradient_accumulation_steps="
                           f"{tr.gradient_accumulation_steps} x hardware.workers={cfg.hardware.workers}) cannot "
                           f"be kept on {world_size} workers; choose a micro_batch_size that divides it")
    return global_batch // (tr.micro_batch_size * world_size)


def notify(progress, line: str) -> None:
    """One line for the user at the driver's console (printed here when no driver follows the run)."""
    if progress is not None:
        progress.put({"event": "notice", "message": line})
    else:
        print(f"lmforge: {line}", file=sys.stderr)


TRACE_SAMPLES_ENV = "LMFORGE_TRACE_SAMPLES"  # test hook: a directory; ranks record their starts and sample ids


def trace_start(rank: int) -> None:
    """Record that this rank started (how many times a worker group was started)."""
    if trace := os.environ.get(TRACE_SAMPLES_ENV):
        Path(trace).mkdir(parents=True, exist_ok=True)
        with open(Path(trace) / "starts.txt", "a") as f:
            f.write(f"{rank}\n")


def trace_samples(loader: ResumableLoader, rank: int) -> None:
    """Record the global sample ids this rank trains on, one micro-batch per line."""
    if not (trace := os.environ.get(TRACE_SAMPLES_ENV)):
        return
    path, take = Path(trace) / f"rank{rank}.txt", loader.next_batch

    def traced():
        ids = loader.sample_ids(loader.position + loader.rank * loader.micro_batch_size, loader.micro_batch_size)
        with open(path, "a") as f:
            f.write(" ".join(map(str, ids.tolist())) + "\n")
        return take()

    path.parent.mkdir(parents=True, exist_ok=True)
    loader.next_batch = traced


def train_step(engine, loader: ResumableLoader, objective, accumulation: int,
               meter: StepMeter | None = None) -> torch.Tensor:
    """One optimizer step over `accumulation` micro-batches; returns this rank's summed loss, still on the
    device and unsynchronized (see mean_over_ranks)."""
    engine.train()
    total = torch.zeros((), dtype=torch.float64, device=engine.device)
    for _ in range(accumulation):
        batch = objective.collate(loader.next_batch(), train=True)
        if meter is not None:
            meter.count(batch, objective.tokens(batch))
        loss = objective.loss(engine, to_device(batch, engine.device))
        engine.backward(loss)
        engine.step()
        total += loss.detach().double()
    return total


def mean_over_ranks(loss_sum: torch.Tensor, batches: int) -> float:
    """A per-rank sum over `batches` batches, averaged over batches and ranks; a collective, so every rank
    must call it."""
    total = loss_sum.clone()
    dist.all_reduce(total)
    return total.item() / (batches * dist.get_world_size())


def to_device(batch: dict[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
    if torch.device(device).type != "cuda":
        return {k: v.to(device) for k, v in batch.items()}
    # A copy from pageable memory waits for every kernel already queued, so the host could never run ahead
    # of the GPU; from pinned memory it is queued like a kernel.
    return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}


def engine_skips_nonfinite(cfg) -> bool:
    """Whether DeepSpeed skips steps with inf/NaN gradients itself: fp16 always does, for loss scaling, and
    bf16 when asked (the config allows skip_nonfinite_steps with bf16 only)."""
    return cfg.hardware.precision == "fp16" or cfg.trainer.skip_nonfinite_steps


def divergence(loss: float, norm, step: int, run_dir: str, weights_ok: bool = True) -> str | None:
    """What to tell the user if the loss, gradients or weights went inf/NaN, else None. The update is already
    applied, so every later step and checkpoint would inherit it; every step that saves checks first. `norm`
    is None where DeepSpeed computed none (no clipping without ZeRO)."""
    values = {"train/loss": loss} | ({"train/grad_norm": float(norm)} if norm is not None else {})
    bad = {k: v for k, v in values.items() if not math.isfinite(v)} | ({} if weights_ok else {"weights": "inf/nan"})
    if not bad:
        return None
    latest = checkpoint.latest_checkpoint(run_dir)
    return (f"{', '.join(f'{k}={v}' for k, v in bad.items())} by step {step}: training diverged. "
            + (f"The newest checkpoint, {latest}, predates it; resume from it with a lower trainer.lr or more "
               "trainer.warmup_steps" if latest else "No checkpoint was written; lower trainer.lr or raise "
               "trainer.warmup_steps")
            + ", or set trainer.skip_nonfinite_steps=true (bf16) to have DeepSpeed skip such steps.")


def weights_finite(engine) -> bool:
    """Whether every weight is finite: one reduction and one read, for steps that save without a grad norm."""
    sums = torch.stack([p.detach().float().sum() for p in engine.module.parameters()])
    return bool(torch.isfinite(sums.sum()))


def stop_diverged(rank: int, tracker, progress, metrics: dict, step: int, message: str, wandb=None) -> None:
    """End a diverged run on every rank (each sees the same all-reduced loss and global grad norm). Ending
    the loop instead of raising keeps Ray Train from restarting a run that would only diverge again; the
    driver turns the message into the run's error. The bad metrics still reach MLflow."""
    publish(rank, tracker, progress, metrics, step, wandb)
    if rank == 0:
        if progress is None:
            raise LmforgeError(message)
        progress.put({"event": "failed", "message": message})


def keeps_best(cfg, objective) -> bool:
    from model.tasks import is_task

    return cfg.checkpoint.keep_best if cfg.checkpoint.keep_best is not None else is_task(type(objective))


def evaluate_job(job: Job) -> dict[str, float]:
    """Validation metrics: a task's over every validation sample (orchestrator.evaluate), an objective's
    over its fixed evaluation batches."""
    from model.tasks import is_task

    if not is_task(type(job.objective)):
        return evaluate(job.engine, job.objective, job.prepared, job.cfg, job.rank, job.world_size)
    from data.finetune import read_references
    from orchestrator.evaluate import evaluate_task

    if job.references is None:
        job.references = read_references(job.prepared)
    metrics = evaluate_task(job.engine, job.objective, open_split(job.prepared, "val"), job.references,
                            job.cfg.trainer.micro_batch_size, job.engine.device, job.rank, job.world_size)
    return {f"val/{k}": v for k, v in metrics.items()}


@torch.no_grad()
def evaluate(engine, objective, prepared: str, cfg, rank: int, world_size: int) -> dict[str, float]:
    """The objective's validation metrics over the same fixed, unshuffled samples every time, split across
    ranks. Each batch adds up its statistics (summed losses, correct predictions, counted tokens); summing
    those over batches and ranks makes the result independent of how the samples were batched."""
    engine.eval()
    store = open_split(prepared, "val")
    batch_size, n_batches = eval_plan(len(store), cfg.trainer.micro_batch_size, cfg.trainer.eval_batches,
                                      world_size)
    loader = ResumableLoader(store, batch_size, rank, world_size, cfg.seed, shuffle=False)
    sums: dict[str, torch.Tensor] = {}
    for _ in range(n_batches):
        batch = to_device(objective.collate(loader.next_batch(), train=False), engine.device)
        for key, value in objective.eval_sums(engine, batch).items():
            sums[key] = sums.get(key, 0) + value.double()
    # One all-reduce for all statistics, on the device: NCCL reduces only GPU tensors.
    keys = sorted(sums)
    stacked = torch.stack([sums[k] for k in keys])
    dist.all_reduce(stacked)
    totals = dict(zip(keys, stacked.tolist()))
    return {f"val/{k}": v for k, v in objective.metrics(totals).items()}


def publish(rank: int, tracker, progress, metrics: dict, step: int, wandb: WandbLogger | None = None) -> None:
    if rank != 0:
        return
    tracker.log_metrics(metrics, step)
    if wandb is not None:
        wandb.log(metrics, step)
    if progress is not None:
        progress.put({"event": "metrics", "step": step, **metrics})


def save_and_report(job: Job, step: int, metrics: dict, evaluated: bool = False, stopped_early: bool = False) -> None:
    """Every rank saves its shards and Ray uploads them; once every upload has returned, rank 0 commits the
    checkpoint by writing its marker into storage, then prunes old checkpoints."""
    cfg, rank, world_size = job.cfg, job.rank, job.world_size
    uri = f"{job.run_dir}/{checkpoint.dir_name(step)}"
    loader_state = job.loader.state_dict() | {"data": job.data_identity}
    with checkpoint.staging_dir() as local:
        mine = checkpoint.save_shards(job.engine, Path(local), step, rank, job.tokenizer)
        everyone = [None] * world_size
        dist.all_gather_object(everyone, mine)
        ray.train.report({"step": step, **metrics}, checkpoint=ray.train.Checkpoint.from_directory(local),
                         checkpoint_dir_name=checkpoint.dir_name(step),
                         checkpoint_upload_fn=checkpoint.torn_upload_fault(step, rank, world_size, uri))
    # A rank's report returns once its own upload has; past this barrier, every rank's files are in storage.
    # A rank that died mid-upload never arrives, so no marker is written for a torn checkpoint.
    dist.barrier()
    if rank != 0:
        return
    checkpoint.crash_before_commit(step)
    files = {name: digest for rank_files in everyone for name, digest in rank_files.items()}
    checkpoint.commit(uri, {"format": 2, "step": step, "world_size": world_size, "loader": loader_state,
                            "metrics": metrics, "config": redact_config(to_dict(cfg)), "files": files,
                            "labels": list(job.objective.vocab.labels), "selection": job.selection.state(),
                            "evaluated": evaluated, "stopped_early": stopped_early})
    best = job.selection.best_step
    keep = {best} if keeps_best(cfg, job.objective) and best is not None else set()
    checkpoint.prune(job.run_dir, cfg.checkpoint.keep_last, step, keep_steps=keep)
    job.tracker.log_checkpoint(step, uri, sum(f["size"] for f in files.values()), metrics)
