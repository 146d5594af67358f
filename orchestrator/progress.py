"""Console progress for a training run: rank 0 sends events through a Ray queue, the driver draws them."""

import queue
import sys
import threading

from tqdm import tqdm

SHOWN = (("train/loss", "loss", "{:.3f}"), ("val/loss", "val", "{:.3f}"), ("train/lr", "lr", "{:.1e}"),
         ("train/tokens_per_second", "tok/s", "{:,.0f}"))


DONE = {"event": "done"}  # put by the driver when trainer.fit returns, so waiting needs no polling


def postfix(metrics: dict) -> str:
    """The progress bar's "loss 4.119  lr 3.0e-03  tok/s 9,150  mfu n/a" from the latest metrics."""
    shown = [f"{name} {fmt.format(metrics[key])}" for key, name, fmt in SHOWN if key in metrics]
    if "train/tokens_per_second" in metrics:
        shown.append(f"mfu {mfu_text(metrics)}")
    return "  ".join(shown)


def mfu_text(metrics: dict) -> str:
    """MFU as a percentage, or n/a when hardware.peak_flops_per_worker names no peak to measure it against."""
    return f"{metrics['train/mfu']:.1%}" if "train/mfu" in metrics else "n/a"


def say(line: str) -> None:
    """One line for the user on stderr, above the progress bar if one is drawn."""
    tqdm.write(f"lmforge: {line}", file=sys.stderr)


def follow(events, worker: threading.Thread) -> dict:
    """Draw a progress bar with an ETA until `worker` (running trainer.fit) ends; return the last metrics."""
    bar, last = None, {}
    while True:
        try:
            # A long wait: each poll is a call into the queue actor, which shares the workers' cores.
            event = events.get(timeout=10)
        except (queue.Empty, Exception):  # ray.util.queue.Empty is not queue.Empty
            if worker.is_alive():
                continue
            break
        if event["event"] == "done":
            break
        if event["event"] == "first_step":
            last.setdefault("first_step_at", event["time"])
            last.setdefault("worker_startup", event["startup"])
            continue
        if event["event"] == "notice":  # e.g. a checkpoint skipped on a restart, and why
            say(event["message"])
            continue
        if event["event"] == "failed":  # the workers ended the run on purpose; the driver reports why
            last["failed"] = event["message"]
            continue
        if event["event"] == "start":
            if bar is None:
                bar = tqdm(total=event["max_steps"], initial=event["step"], unit="step", file=sys.stderr,
                           dynamic_ncols=True, desc="train")
            else:  # a restart after a failure resumes from a checkpoint
                bar.n = event["step"]
                bar.write(f"restarted from step {event['step']}")
            continue
        last.update({k: v for k, v in event.items() if "/" in k})
        if bar is not None:
            bar.n = event["step"]
            bar.set_postfix_str(postfix(last), refresh=False)
            bar.refresh()
    if bar is not None:
        bar.close()
    return last
