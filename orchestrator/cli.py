"""The `lmforge` command: subcommands map to functions, and every one takes Hydra overrides."""

import argparse
import sys

from common.errors import LmforgeError
from orchestrator.quiet import set_verbosity

OVERRIDES_HELP = "Hydra overrides: key=value, group=option, +key=value"
VERBOSE_HELP = "show Ray, DeepSpeed and MLflow logs"


def cmd_config_show(args: argparse.Namespace) -> int:
    from orchestrator.config import load_config, to_yaml

    print(to_yaml(load_config(args.overrides)), end="")
    return 0


def cmd_config_validate(args: argparse.Namespace) -> int:
    from orchestrator.config import load_config

    cfg = load_config(args.overrides)
    print(f"config ok: model={cfg.model.name} objective={cfg.objective.name} data={cfg.data.name} "
          f"hardware={cfg.hardware.name} tracking={cfg.tracking.name}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    import psutil

    from orchestrator.config import load_config
    from orchestrator.launcher import train
    from orchestrator.redact import redact_value
    from orchestrator.tracking import is_remote, tracking_uri

    cfg = load_config(args.overrides)
    result = train(cfg, args.overrides, address=args.address, worker_env=args.worker_env)
    if result.already_done:
        print(f"run:         {result.run_name} {result.already_done}; nothing to train (raise trainer.max_steps "
              "to continue it)")
        print(f"latest:      {result.checkpoint}")
        return 0
    from model.objectives import get_objective

    headline = cfg.trainer.monitor or get_objective(cfg.objective.name).selection_metric
    shown = {k: v for k, v in result.metrics.items() if k in ("train/loss", "val/loss", "val/perplexity", headline)}
    print(f"run:         {result.run_name}  ({', '.join(f'{k}={v:.4g}' for k, v in shown.items())})")
    if "train/tokens_per_second" in result.metrics:
        print(f"speed:       {speed_summary(result.metrics)}")
    print(f"checkpoints: {result.run_dir}")
    if result.checkpoint:
        print(f"latest:      {result.checkpoint}")
    if result.seconds_to_first_step is not None:
        # Counted from this process's start, as a user waits: Python and lmforge's imports come first.
        launched = psutil.Process().create_time()
        startup = {"python_and_imports": result.started_at - launched} | result.startup
        phases = ", ".join(f"{name} {secs:.1f}s" for name, secs in startup.items())
        print(f"first step:  {sum(startup.values()):.1f}s after launch ({phases})")
    if result.mlflow_run_id:
        uri = redact_value(tracking_uri(cfg.tracking, cfg.paths.root))
        print(f"mlflow run:  {result.mlflow_run_id}  in {uri}")
        browse = uri if is_remote(uri) else f"lmforge ui paths.root={cfg.paths.root}{ui_overrides(args.overrides)}"
        print(f"browse:      {browse}")
    print(f"resume:      lmforge train resume={result.run_dir}")
    print(f"export:      lmforge export {result.run_dir} --out {cfg.paths.root}/export/{result.run_name}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from orchestrator.sweep import run_sweep
    from orchestrator.sweep_results import summary_lines

    summary = run_sweep(args.overrides, address=args.address, worker_env=args.worker_env)
    print("\n".join(summary_lines(summary)))
    return 0 if summary.best is not None else 1


def ui_overrides(overrides: list[str]) -> str:
    """The train command's overrides besides paths.root that decide where the MLflow store is."""
    kept = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") in ("tracking", "tracking.tracking_uri")]
    return "".join(f" {o}" for o in kept)


def cmd_ui(args: argparse.Namespace) -> int:
    import ipaddress
    import os
    import signal
    import subprocess

    from orchestrator.config import load_config
    from orchestrator.run_record import ui_url
    from orchestrator.tracking import is_remote, tracking_uri, ui_command

    cfg = load_config(args.overrides)
    uri = tracking_uri(cfg.tracking, cfg.paths.root)
    if is_remote(uri):
        print(f"runs are on the tracking server {uri}; open it in a browser")
        return 0
    try:
        loopback = ipaddress.ip_address(args.host).is_loopback
    except ValueError:
        loopback = args.host == "localhost"
    if not loopback:
        print(f"lmforge: warning: the MLflow UI on {args.host} is reachable from other machines and has no "
              "authentication; for a shared server run `mlflow server --app-name basic-auth` instead",
              file=sys.stderr)
    print(f"MLflow UI for {uri}: {ui_url(f'http://{args.host}:{args.port}', experiment_id(cfg))}  (Ctrl-C to stop)",
          flush=True)
    # Its own process group: Ctrl-C reaches only lmforge, which stops the server and its workers with SIGTERM
    # (their graceful shutdown), instead of each printing a KeyboardInterrupt traceback.
    server = subprocess.Popen(ui_command(cfg.tracking, cfg.paths.root, args.host, args.port), start_new_session=True)
    try:
        return server.wait()
    except KeyboardInterrupt:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        print("lmforge: MLflow UI stopped", file=sys.stderr)
        return 0


def experiment_id(cfg) -> str | None:
    """The configured experiment's id in the local store, for a link straight to its runs table (MLflow 3.17's
    UI opens anything else on the GenAI view); None when it does not exist yet or the store cannot be read."""
    from orchestrator.tracking import connect

    try:
        experiment = connect(cfg.tracking, cfg.paths.root).get_experiment_by_name(cfg.tracking.experiment)
    except Exception:
        return None
    return experiment.experiment_id if experiment else None


def speed_summary(metrics: dict) -> str:
    from orchestrator.progress import mfu_text

    return (f"{metrics['train/tokens_per_second']:,.0f} tokens/s, {metrics['train/step_time_s']:.3f} s/step, "
            f"MFU {mfu_text(metrics)} (last logged window)")


def cmd_data_prepare(args: argparse.Namespace) -> int:
    from data.prepared import MANIFEST, summarize
    from orchestrator.config import load_config
    from orchestrator.launcher import prepare_data, prepared_location

    cfg = load_config(args.overrides)
    cached = (prepared_location(cfg) / MANIFEST).is_file()
    # engine=auto: Ray Data when a cluster is given (RAY_ADDRESS or a running Ray), else this process.
    out = prepare_data(cfg, progress=True, worker_env=args.worker_env)
    print(("reused " if cached else "") + summarize(out))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    import json

    from orchestrator.config import load_config
    from orchestrator.export import export

    out = export(args.target, args.out, load_config(args.overrides), best=args.best)
    architecture = json.loads((out / "config.json").read_text())["architectures"][0]
    print(f"exported to {out}  (load with transformers.{architecture}.from_pretrained({str(out)!r}))")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from orchestrator.config import load_config
    from orchestrator.export import generate

    print(generate(args.target, args.prompt, load_config(args.overrides), max_new_tokens=args.max_new_tokens,
                   temperature=args.temperature, top_k=args.top_k, seed=args.seed))
    return 0


def data_given(overrides: list[str]) -> bool:
    return any(o.lstrip("+~").split("=", 1)[0].split(".", 1)[0] == "data" for o in overrides)


def cmd_eval(args: argparse.Namespace) -> int:
    import json
    import time
    from pathlib import Path

    from orchestrator import inference
    from orchestrator.config import load_config

    cfg = load_config(args.overrides)
    trained = inference.load(args.target, cfg, best=args.best)
    metrics, report = inference.evaluate(trained, cfg, data_given(args.overrides), args.batch_size)
    out = Path(args.report) if args.report else (
        Path(trained.run["run_dir"]) / "eval" if trained.run.get("run_dir") and "://" not in trained.run["run_dir"]
        else Path.cwd()) / f"eval-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"{report['task']} on {report['data']}: {report['examples']} examples")
    print(inference.table(metrics, report["baseline"]))
    print(f"report:      {out}")
    if trained.run.get("mlflow_run_id") and cfg.tracking.backend == "mlflow":
        inference.log_to_run(cfg, trained.run["mlflow_run_id"], metrics, [out], "eval")
        print(f"mlflow run:  {trained.run['mlflow_run_id']} (metrics eval/*, artifact eval/{out.name})")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from model.tasks import is_task
    from orchestrator import inference
    from orchestrator.config import load_config

    trained = inference.load(args.target, load_config(args.overrides), best=args.best)
    task = trained.task()
    if not is_task(type(task)):
        raise LmforgeError(f"objective={task.name} is a pretraining objective; use `lmforge generate` to sample "
                           f"text from it")
    for i, text in enumerate(args.texts):
        if len(args.texts) > 1:
            print(f"[{i + 1}] {text}")
        print(task.show(task.infer(trained.model, trained.tokenizer, text, context=args.context)))
    return 0


def cmd_attention(args: argparse.Namespace) -> int:
    from pathlib import Path

    from orchestrator import inference
    from orchestrator.attention import attention_maps
    from orchestrator.config import load_config

    cfg = load_config(args.overrides)
    trained = inference.load(args.target, cfg, best=args.best)
    paths = attention_maps(trained.model, trained.tokenizer, args.text, Path(args.out), layer=args.layer,
                           max_tokens=args.max_tokens)
    for path in paths:
        print(f"wrote {path}")
    if trained.run.get("mlflow_run_id") and cfg.tracking.backend == "mlflow":
        inference.log_to_run(cfg, trained.run["mlflow_run_id"], {}, paths, "attention")
        print(f"mlflow run:  {trained.run['mlflow_run_id']} (artifacts attention/)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lmforge", description="Train transformer language models on Ray with DeepSpeed ZeRO.")
    parser.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    # Every command also takes -v after its name; SUPPRESS keeps an absent one from resetting `lmforge -v`.
    verbosity = argparse.ArgumentParser(add_help=False)
    verbosity.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    config = commands.add_parser("config", help="show or validate the composed config")
    config_commands = config.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    show = config_commands.add_parser("show", help="print the fully resolved config as YAML",
                                      parents=[verbosity])
    show.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    show.set_defaults(func=cmd_config_show)
    validate = config_commands.add_parser("validate", help="exit 0 if the config is valid, else explain",
                                          parents=[verbosity])
    validate.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    validate.set_defaults(func=cmd_config_validate)

    data = commands.add_parser("data", help="prepare corpora into tokenized WebDataset shards")
    data_commands = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    prepare = data_commands.add_parser("prepare", help="clean, tokenize (Ray Data on a cluster), pack and shard conf/data",
                                       parents=[verbosity])
    prepare.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    prepare.set_defaults(func=cmd_data_prepare)

    train = commands.add_parser("train", help="pretrain a language model on Ray Train with DeepSpeed ZeRO workers",
                                parents=[verbosity])
    train.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local cluster)")
    train.add_argument("overrides", nargs="*", help=OVERRIDES_HELP + "; resume=<run dir | MLflow run id>")
    train.set_defaults(func=cmd_train)

    sweep = commands.add_parser("sweep", help="search hyperparameters with Ray Tune: every trial a training run, "
                                "ASHA stops trailing ones", parents=[verbosity])
    sweep.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local cluster)")
    sweep.add_argument("overrides", nargs="*", help=OVERRIDES_HELP + "; sweep expressions: key=choice(a,b), "
                       "key=range(start,stop,step), key=tag(log,interval(low,high)); sweep=<preset>; "
                       "resume=<sweep dir>")
    sweep.set_defaults(func=cmd_sweep)

    from orchestrator.jobs import add_job_commands  # submit, status, logs, stop, list

    add_job_commands(commands, verbosity)

    ui = commands.add_parser("ui", help="browse runs in the MLflow UI (bound to 127.0.0.1 unless --host)",
                             parents=[verbosity])
    ui.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)")
    ui.add_argument("--port", type=int, default=5000)
    ui.add_argument("overrides", nargs="*", help=OVERRIDES_HELP + " (to find the MLflow store)")
    ui.set_defaults(func=cmd_ui)

    target_help = "a run directory, a checkpoint directory, or an MLflow run id"
    export = commands.add_parser("export", help="consolidate ZeRO shards into a Hugging Face model directory",
                                 parents=[verbosity])
    export.add_argument("target", help=target_help)
    export.add_argument("--out", required=True, help="output directory (config, safetensors, tokenizer)")
    export.add_argument("--best", action="store_true",
                        help="the run's best checkpoint by trainer.monitor, instead of its newest")
    export.add_argument("overrides", nargs="*", help=OVERRIDES_HELP + " (to find the MLflow store)")
    export.set_defaults(func=cmd_export)

    generate = commands.add_parser("generate", help="sample text from a trained checkpoint",
                                   parents=[verbosity])
    generate.add_argument("target", help=target_help)
    generate.add_argument("prompt", help="text to continue")
    generate.add_argument("--max-new-tokens", type=int, default=64)
    generate.add_argument("--temperature", type=float, default=0.8, help="0 for greedy decoding")
    generate.add_argument("--top-k", type=int, default=50)
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("overrides", nargs="*", help=OVERRIDES_HELP + " (to find the MLflow store)")
    generate.set_defaults(func=cmd_generate)

    any_target = target_help + ", or an export directory"
    evaluate = commands.add_parser("eval", help="score a fine-tuned model on a dataset: JSON report, table, MLflow",
                                   parents=[verbosity])
    evaluate.add_argument("target", help=any_target)
    evaluate.add_argument("--best", action="store_true", help="a run's best checkpoint instead of its newest")
    evaluate.add_argument("--batch-size", type=int, default=32)
    evaluate.add_argument("--report", help="where the JSON report goes (default: <run>/eval/eval-<time>.json)")
    evaluate.add_argument("overrides", nargs="*", help=OVERRIDES_HELP + "; data.*: the records to score (default: "
                                                       "the run's validation split)")
    evaluate.set_defaults(func=cmd_eval)

    predict = commands.add_parser("predict", help="run a fine-tuned model on texts: labels, entities, answers, "
                                  "summaries, replies", parents=[verbosity])
    predict.add_argument("target", help=any_target)
    predict.add_argument("texts", nargs="+", metavar="text", help="input text(s); for QA, the question(s)")
    predict.add_argument("--context", help="extractive_qa: the passage to answer from; seq_cls: a second text")
    predict.add_argument("--best", action="store_true", help="a run's best checkpoint instead of its newest")
    predict.add_argument("--overrides", nargs="*", default=[], help=OVERRIDES_HELP + " (to find the MLflow store)")
    predict.set_defaults(func=cmd_predict)

    attention = commands.add_parser("attention", help="plot a model's attention over a text (a PNG per layer, "
                                    "plus the heads of one layer)", parents=[verbosity])
    attention.add_argument("target", help=any_target)
    attention.add_argument("text")
    attention.add_argument("--layer", type=int, help="the layer whose heads are plotted (default: the last)")
    attention.add_argument("--out", default="attention", help="output directory (default: ./attention)")
    attention.add_argument("--max-tokens", type=int, default=64, help="longer texts are cut to this many tokens")
    attention.add_argument("--best", action="store_true", help="a run's best checkpoint instead of its newest")
    attention.add_argument("overrides", nargs="*", help=OVERRIDES_HELP + " (to find the MLflow store)")
    attention.set_defaults(func=cmd_attention)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # argparse gives all positionals of a command at their first run (`target` and the overrides after
    # it), so overrides written after an option (`export RUN --out DIR paths.root=X`) come back unparsed.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if any(item.startswith("-") for item in extra) or not hasattr(args, "overrides"):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = list(args.overrides) + extra
    args.worker_env = set_verbosity(args.verbose)
    try:
        return args.func(args)
    except LmforgeError as e:
        print(f"lmforge: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lmforge: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
