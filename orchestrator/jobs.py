"""`lmforge submit / status / logs / stop / list`: `lmforge train` as a Ray job, through Ray's Jobs API."""

import argparse
import asyncio
import contextlib
import importlib.util
import logging
import os
import secrets
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from common.errors import LmforgeError
from orchestrator.redact import redact_value

# lmforge's own packages: a job runs exactly the copies this process imports, wherever they are installed.
PACKAGES = {"common": "errors.py", "orchestrator": "cli.py", "model": "objectives", "data": "prepared.py"}
# Ray keeps uploaded packages in its GCS, whose messages are capped (ray._private.runtime_env.packaging).
UPLOAD_LIMIT = 100 * 1024 * 1024
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
DEFAULT_TOKEN_FILE = "~/.ray/auth_token"
OVERRIDES_HELP = "Hydra overrides, as for `lmforge train`"


@dataclass
class Token:
    value: str
    source: str  # where it was found, to name in messages (never the value)


def find_token() -> Token | None:
    """Ray's own order: RAY_AUTH_TOKEN, then the file at RAY_AUTH_TOKEN_PATH, then ~/.ray/auth_token."""
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return Token(os.environ["RAY_AUTH_TOKEN"].strip(), "RAY_AUTH_TOKEN")
    if os.environ.get("RAY_AUTH_TOKEN_PATH"):
        path = Path(os.environ["RAY_AUTH_TOKEN_PATH"]).expanduser()
        if not path.is_file():
            raise LmforgeError(f"RAY_AUTH_TOKEN_PATH={path} is not a file")
        return Token(path.read_text().strip(), f"RAY_AUTH_TOKEN_PATH={path}")
    path = Path(DEFAULT_TOKEN_FILE).expanduser()
    if path.is_file() and path.read_text().strip():
        return Token(path.read_text().strip(), str(path))
    return None


class Cluster:
    """A Ray cluster's Jobs API, with lmforge's token sent and Ray's errors turned into one-line messages."""

    def __init__(self, address: str | None):
        self.address = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
        if not self.address:
            raise LmforgeError("no Ray cluster given: pass --address http://<head>:8265 or set RAY_ADDRESS")
        self.shown = redact_value(self.address)
        self.token = find_token()
        # Ray's client sends a token only with RAY_AUTH_MODE=token in its environment; an explicit header
        # works whatever that is, and Ray leaves a header it was given alone.
        self.headers = {"Authorization": f"Bearer {self.token.value}"} if self.token else {}
        from ray.job_submission import JobSubmissionClient

        if os.environ.get("LMFORGE_VERBOSE") != "1":  # Ray's client logs every upload at INFO
            for name in ("ray.dashboard.modules.dashboard_sdk", "ray._private.runtime_env.packaging",
                         "ray.dashboard.modules.job.sdk"):
                logging.getLogger(name).setLevel(logging.WARNING)

        with self.errors(), without_address_env():  # Ray prefers RAY_ADDRESS to the address it is given
            self.client = JobSubmissionClient(self.address, headers=self.headers)
        self.url = self.client.get_address()

    @contextlib.contextmanager
    def errors(self, job: str | None = None):
        import requests
        from ray.exceptions import AuthenticationError

        try:
            yield
        except AuthenticationError as error:
            raise LmforgeError(self.auth_message(403 if "Authentication failed" in str(error) else 401)) from None
        except (ConnectionError, requests.exceptions.ConnectionError, requests.exceptions.Timeout):
            raise LmforgeError(f"cannot reach the Ray cluster at {self.shown}: nothing answers there (is the "
                               "cluster up, and is this its dashboard address, http://<head>:8265?)") from None
        except RuntimeError as error:
            text = str(error)
            if job is not None and ("does not exist" in text or "404" in text):
                raise LmforgeError(f"no job {job} on the Ray cluster at {self.shown} (`lmforge list` shows the "
                                   "lmforge jobs)") from None
            raise LmforgeError(f"the Ray cluster at {self.shown} refused: {redact_value(first_line(text))}") from None

    def auth_message(self, status: int) -> str:
        if self.token is None or status == 401:
            return (f"the Ray cluster at {self.shown} requires a token and none was found: set RAY_AUTH_TOKEN "
                    f"(or RAY_AUTH_TOKEN_PATH, or put it in {DEFAULT_TOKEN_FILE}) to the cluster's token")
        return (f"the Ray cluster at {self.shown} rejected the token from {self.token.source}: it is not this "
                "cluster's RAY_AUTH_TOKEN")

    def alive_nodes(self) -> list[dict]:
        """Every alive node with its total resources, from the dashboard's state API (the Jobs API's server)."""
        import requests

        with self.errors():
            response = requests.get(f"{self.url}/api/v0/nodes", params={"detail": "1", "limit": "10000"},
                                    headers=self.headers, timeout=30)
            if response.status_code in (401, 403):
                raise LmforgeError(self.auth_message(response.status_code))
            response.raise_for_status()
        nodes = response.json()["data"]["result"]["result"]
        return [node for node in nodes if node.get("state") == "ALIVE"]

    def job(self, job_id: str):
        with self.errors(job_id):
            return self.client.get_job_info(job_id)


@contextlib.contextmanager
def without_address_env():
    saved = {key: os.environ.pop(key) for key in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS") if key in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else ""


# --- what the job runs -------------------------------------------------------------------------------------

def package_dirs() -> dict[str, Path]:
    """Where this process imports lmforge's packages from: a checkout or site-packages."""
    found = {}
    for name, marker in PACKAGES.items():
        spec = importlib.util.find_spec(name)
        location = Path(list(spec.submodule_search_locations)[0]) if spec and spec.submodule_search_locations else None
        if location is None or not (location / marker).exists():
            where = f" ({location} has no {marker})" if location else ""
            raise LmforgeError(f"the Python package {name!r} that this process imports is not lmforge's{where}; "
                               "a directory of that name on sys.path shadows it")
        found[name] = location
    return found


def stage_code(into: Path) -> int:
    """Copy lmforge's packages and config directory into `into`, laid out as a checkout; return the bytes.

    One directory for all of it, rather than a py_module per package: conf/ sits beside the packages, where
    orchestrator.config finds it in every process of the job (driver, Train workers, Tune trials), and the
    driver's own ray.init ships the same tree again to its workers (launcher.connect's working_dir).
    Only source and YAML are copied: never compiled files, site-packages or data.
    """
    from orchestrator.config import config_dir

    for name, location in package_dirs().items():
        shutil.copytree(location, into / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.so"))
    conf = config_dir()

    def not_config(folder: str, names: list[str]) -> list[str]:
        return [n for n in names if not (Path(folder, n).is_dir() or n.endswith((".yaml", ".yml")))]

    shutil.copytree(conf, into / "conf", ignore=not_config)
    sizes = {p: p.stat().st_size for p in into.rglob("*") if p.is_file()}
    total = sum(sizes.values())
    if total >= UPLOAD_LIMIT:
        largest = sorted(sizes.items(), key=lambda kv: -kv[1])[:3]
        shown = ", ".join(f"{p.relative_to(into)} {size / 2**20:.1f} MiB" for p, size in largest)
        raise LmforgeError(f"lmforge's code and config come to {total / 2**20:.1f} MiB, over Ray's 100 MiB "
                           f"upload limit; largest: {shown} (config from {conf}, code from "
                           f"{package_dirs()['orchestrator'].parent})")
    return total


def runtime_env(staged: Path) -> dict:
    # The job's driver, `lmforge train`, passes its own runtime_env (the same code tree) to ray.init; Ray
    # refuses a driver runtime_env that repeats a key of the job's unless told that the driver's wins.
    return {"working_dir": str(staged), "env_vars": {"RAY_OVERRIDE_JOB_RUNTIME_ENV": "1"}}


def given(overrides: list[str], key: str) -> str | None:
    """The value of `key` on the command line (the last one wins, as in Hydra)."""
    values = [o.split("=", 1)[1] for o in overrides if "=" in o and o.split("=", 1)[0].lstrip("+~") == key]
    return values[-1] if values else None


def replace(overrides: list[str], key: str, value: str) -> list[str]:
    kept = [o for o in overrides if not ("=" in o and o.split("=", 1)[0].lstrip("+~") == key)]
    return kept + [f"{key}={value}"]


def is_uri(path: str) -> bool:
    return "://" in path


def job_overrides(cfg, overrides: list[str], run_name: str | None) -> list[str]:
    """The train command's overrides with every local path absolute (a job runs in a temporary directory on
    the head node) and the run name fixed, so the printed locations are the job's."""
    out = list(overrides)
    if not is_uri(cfg.paths.root):
        out = replace(out, "paths.root", str(Path(cfg.paths.root).expanduser().resolve()))
    for key in ("checkpoint.storage", "data.prepared_dir"):
        value = given(out, key)
        if value and value != "null" and not is_uri(value):
            out = replace(out, key, str(Path(value).expanduser().resolve()))
    if run_name and not cfg.resume and given(out, "run_name") is None:
        out.append(f"run_name={run_name}")
    return out


# --- checks before anything is submitted ---------------------------------------------------------------------

def check_fit(cfg, nodes: list[dict]) -> None:
    """Refuse a run the cluster can never place: too few CPUs or GPUs in all, or no node big enough for one."""
    hw = cfg.hardware
    workers = hw.min_workers or hw.workers
    per_worker = {"CPU": hw.cpus_per_worker} | ({"GPU": 1.0} if hw.use_gpu else {})
    totals = {r: sum(n.get("resources_total", {}).get(r, 0.0) for n in nodes) for r in ("CPU", "GPU")}
    fits_one = any(all(n.get("resources_total", {}).get(r, 0.0) >= need for r, need in per_worker.items())
                   for n in nodes)
    short = [r for r, need in per_worker.items() if totals[r] < need * workers]
    if short or not fits_one:
        has = f"{totals['CPU']:g} CPUs and {totals['GPU']:g} GPUs on {len(nodes)} node(s)"
        biggest = max((n.get("resources_total", {}).get("CPU", 0.0) for n in nodes), default=0.0)
        asked = (f"hardware={hw.name} asks for {workers} worker(s) x {hw.cpus_per_worker:g} CPU"
                 + (" + 1 GPU" if hw.use_gpu else "") + (f" (hardware.min_workers={workers})" if hw.min_workers
                                                        else ""))
        why = "" if not short else f" (too few {' and '.join(short)})"
        if not short:
            why = f" (no node has room for one worker; the largest has {biggest:g} CPUs)"
        raise LmforgeError(f"the Ray cluster cannot fit this run: it has {has}; {asked}{why}. Lower "
                           "hardware.workers or hardware.cpus_per_worker, or pass --allow-scale-up if the "
                           "cluster's autoscaler adds nodes")


def local_location(path: str) -> bool:
    return not is_uri(path)


def check_shared_storage(cfg, shared_root: bool) -> None:
    """On several nodes, every worker reads the prepared data and writes checkpoints, and rank 0 logs to
    MLflow: a path on one node's disk breaks that, some steps later and on another node."""
    from orchestrator.runs import storage_root
    from orchestrator.tracking import tracking_uri

    root = cfg.paths.root
    uri = tracking_uri(cfg.tracking, root)
    instead = ("a shared filesystem mounted at the same path on every node (say so with --shared-root), "
               "checkpoint.storage=s3://... or gs://..., and tracking.tracking_uri=http(s)://<MLflow server>")
    if uri.startswith("sqlite:") or uri.startswith("file:") or "://" not in uri:
        store = uri.split(":///", 1)[-1]
        under_root = Path(store).resolve().is_relative_to(Path(root).resolve()) if not is_uri(root) else False
        if not (shared_root and under_root):
            raise LmforgeError(f"the cluster has several nodes, and the MLflow store {redact_value(uri)} is a local "
                               f"file that only the head node can write; set tracking.tracking_uri=http(s)://"
                               f"<MLflow server> (cluster/mlflow-server.sh), or keep it under a paths.root on a "
                               f"shared filesystem and pass --shared-root")
    if shared_root:
        return
    storage = storage_root(cfg)
    prepared = cfg.data.prepared_dir or f"{root}/data"
    for what, path in (("checkpoint storage", storage), ("prepared data", prepared)):
        if local_location(path):
            raise LmforgeError(f"the cluster has several nodes, and the {what} ({path}) is a path on one node's "
                               f"disk; use {instead}")


# --- the verbs -----------------------------------------------------------------------------------------------

def cmd_submit(args: argparse.Namespace) -> int:
    from orchestrator.config import load_config
    from orchestrator.runs import default_run_name, storage_root
    from orchestrator.tracking import tracking_uri

    if args.sweep:
        return submit_sweep(args)
    cfg = load_config(args.overrides)
    run_name = cfg.run_name or (None if cfg.resume else default_run_name(cfg))
    overrides = job_overrides(cfg, args.overrides, run_name)
    cfg = load_config(overrides)  # the run as the job will compose it: absolute paths, its name
    cluster = Cluster(args.address)
    nodes = cluster.alive_nodes()
    if not args.allow_scale_up:
        check_fit(cfg, nodes)
    if len(nodes) > 1:
        check_shared_storage(cfg, args.shared_root)
    label = run_name or f"resume-{Path(cfg.resume.rstrip('/')).name}"
    job_id = f"lmforge-{label}-{secrets.token_hex(3)}"
    run_dir = f"{storage_root(cfg)}/{run_name}" if run_name else f"the run of {cfg.resume}"
    uri = redact_value(tracking_uri(cfg.tracking, cfg.paths.root))
    send(cluster, job_id, ["lmforge", "train", *overrides],
         {"lmforge": "1", "run_name": run_name or label, "checkpoints": run_dir, "tracking_uri": uri})
    print(f"run:         {run_name or label}")
    print(f"checkpoints: {run_dir}")
    print(f"mlflow:      {uri}  (experiment {cfg.tracking.experiment}, run {run_name or label})")
    print(f"follow:      lmforge logs {job_id} --follow    (stop: lmforge stop {job_id})")
    if not args.wait:
        return 0
    return follow(cluster, job_id)


def send(cluster: Cluster, job_id: str, command: list[str], metadata: dict) -> None:
    """Submit `command` as the job `job_id`, shipping lmforge's code and config, and say where it went."""
    with tempfile.TemporaryDirectory(prefix="lmforge-job-") as staged:
        shipped = stage_code(Path(staged))
        with cluster.errors():
            cluster.client.submit_job(entrypoint=shlex.join(command), submission_id=job_id,
                                      runtime_env=runtime_env(Path(staged)), metadata=metadata)
    print(f"job:         {job_id}  (on {cluster.shown}; code and config shipped: {shipped / 2**10:.0f} KiB)")


def submit_sweep(args: argparse.Namespace) -> int:
    """`lmforge sweep` as a Ray job, so the sweep's driver (Tune's controller) lives on the cluster, not on a
    laptop. Every trial's config is checked here first, as `lmforge sweep` itself does before it starts."""
    from orchestrator.config import load_config
    from orchestrator.sweep import plan, sweep_name
    from orchestrator.tracking import tracking_uri

    resume = given(args.overrides, "resume")
    if resume is not None:  # the sweep continues as it was configured; only its path must be absolute here
        name = Path(resume.rstrip("/")).name
        entry = ["resume=" + (resume if is_uri(resume) else str(Path(resume).expanduser().resolve()))]
        sweep_dir = entry[0].split("=", 1)[1]
        uri = None
    else:
        fixed, checked = plan(args.overrides)
        cfg = checked.cfg
        name = sweep_name(cfg)
        fixed = job_overrides(cfg, fixed, name)
        cfg = load_config(fixed)  # as the job will compose it: absolute paths, the sweep's name
        cluster_nodes = Cluster(args.address).alive_nodes()
        if not args.allow_scale_up:
            check_fit(cfg, cluster_nodes)  # one trial at a time must fit; Tune queues the rest
        if len(cluster_nodes) > 1:
            check_shared_storage(cfg, args.shared_root)
        entry = fixed + [s.expression for s in checked.swept]
        sweep_dir = f"{cfg.paths.root}/sweeps/{name}"
        uri = redact_value(tracking_uri(cfg.tracking, cfg.paths.root))
    cluster = Cluster(args.address)
    job_id = f"lmforge-{name}-{secrets.token_hex(3)}"
    send(cluster, job_id, ["lmforge", "sweep", *entry],
         {"lmforge": "1", "run_name": name, "sweep": sweep_dir} | ({"tracking_uri": uri} if uri else {}))
    print(f"sweep:       {name}")
    print(f"results:     {sweep_dir}")
    if uri:
        print(f"mlflow:      {uri}  (a parent run {name}, one child run per trial)")
    print(f"follow:      lmforge logs {job_id} --follow    (stop: lmforge stop {job_id})")
    return follow(cluster, job_id) if args.wait else 0


def follow(cluster: Cluster, job_id: str) -> int:
    """Stream a job's output until it ends; 0 only for SUCCEEDED."""
    import aiohttp

    async def stream():
        async for chunk in cluster.client.tail_job_logs(job_id):
            print(chunk, end="", flush=True)

    try:
        with cluster.errors(job_id):
            asyncio.run(stream())
    except aiohttp.WSServerHandshakeError as error:
        if error.status in (401, 403):
            raise LmforgeError(cluster.auth_message(error.status)) from None
        raise LmforgeError(f"no job {job_id} on the Ray cluster at {cluster.shown}") from None
    except aiohttp.ClientError as error:
        print(f"lmforge: the log stream broke off ({type(error).__name__}); waiting for the job to end",
              file=sys.stderr)
    except KeyboardInterrupt:
        print(f"lmforge: stopped following; the job runs on (lmforge stop {job_id} ends it)", file=sys.stderr)
        return 130
    return outcome(cluster, job_id)


def outcome(cluster: Cluster, job_id: str, wait_s: float = 60.0) -> int:
    """The job's final state, printed; the log stream can close a moment before the state is written."""
    deadline = time.monotonic() + wait_s
    info = cluster.job(job_id)
    while str(info.status) not in TERMINAL and time.monotonic() < deadline:
        time.sleep(1)
        info = cluster.job(job_id)
    print(f"lmforge: job {job_id} {info.status}" + (f": {first_line(info.message)}" if info.message and
                                                   str(info.status) != "SUCCEEDED" else ""), file=sys.stderr)
    return 0 if str(info.status) == "SUCCEEDED" else 1


def cmd_status(args: argparse.Namespace) -> int:
    cluster = Cluster(args.address)
    info = cluster.job(args.job)
    meta = info.metadata or {}
    print(f"job:         {args.job}")
    print(f"status:      {info.status}")
    if meta.get("run_name"):
        print(f"run:         {meta['run_name']}")
        print(f"checkpoints: {meta.get('checkpoints', '')}")
        print(f"mlflow:      {meta.get('tracking_uri', '')}")
    print(f"started:     {when(info.start_time)}" + (f"  ended: {when(info.end_time)}" if info.end_time else ""))
    if info.message and str(info.status) != "SUCCEEDED":
        print(f"message:     {first_line(info.message)}")
    return 0


def when(ms: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000)) if ms else "-"


def cmd_list(args: argparse.Namespace) -> int:
    cluster = Cluster(args.address)
    with cluster.errors():
        jobs = [j for j in cluster.client.list_jobs() if (j.metadata or {}).get("lmforge") == "1"]
    if not jobs:
        print(f"no lmforge jobs on {cluster.shown}")
        return 0
    jobs.sort(key=lambda j: j.start_time or 0)
    width = max(len(j.submission_id or "") for j in jobs)
    print(f"{'JOB':<{width}}  {'STATUS':<9}  {'STARTED':<19}  RUN")
    for j in jobs:
        print(f"{j.submission_id:<{width}}  {str(j.status):<9}  {when(j.start_time):<19}  "
              f"{(j.metadata or {}).get('run_name', '')}")
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    cluster = Cluster(args.address)
    if args.follow:
        return follow(cluster, args.job)
    with cluster.errors(args.job):
        print(cluster.client.get_job_logs(args.job), end="")
    return outcome(cluster, args.job, wait_s=0)


def cmd_stop(args: argparse.Namespace) -> int:
    cluster = Cluster(args.address)
    info = cluster.job(args.job)
    if str(info.status) in TERMINAL:
        print(f"job {args.job} already ended: {info.status}")
        return 0
    with cluster.errors(args.job):
        cluster.client.stop_job(args.job)
    print(f"stopping {args.job} (its driver gets Ray's stop signal, then SIGKILL after the cluster's "
          "RAY_JOB_STOP_WAIT_TIME_S)", file=sys.stderr)
    deadline = time.monotonic() + 120
    while str(info.status) not in TERMINAL and time.monotonic() < deadline:
        time.sleep(1)
        info = cluster.job(args.job)
    print(f"job {args.job} {info.status}")
    return 0 if str(info.status) == "STOPPED" else 1


def add_job_commands(commands, verbosity: argparse.ArgumentParser) -> None:
    """The job verbs on `lmforge`'s subcommand parser."""
    address_help = "the cluster's dashboard, http://<head>:8265 (default: $RAY_ADDRESS)"
    submit = commands.add_parser("submit", help="run `lmforge train` as a Ray job on a cluster", parents=[verbosity])
    submit.add_argument("--address", help=address_help)
    submit.add_argument("--wait", action="store_true", help="stream the job's output; exit 0 only if it succeeds")
    submit.add_argument("--shared-root", action="store_true",
                        help="paths.root is on a filesystem every node mounts at the same path (NFS, Lustre, "
                             "EFS, Filestore): its checkpoints, prepared data and SQLite MLflow store are shared")
    submit.add_argument("--allow-scale-up", action="store_true",
                        help="submit even if the cluster's nodes cannot hold the run now: its autoscaler adds nodes")
    submit.add_argument("--sweep", action="store_true",
                        help="run `lmforge sweep` instead of `lmforge train`: the overrides may hold sweep "
                             "expressions (key=choice(a,b), ...), and resume=<sweep dir> continues a sweep")
    submit.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    submit.set_defaults(func=cmd_submit)

    for name, func, help_text in (("status", cmd_status, "a job's state, run, checkpoints and MLflow store"),
                                  ("logs", cmd_logs, "a job's output; exit 0 only if it succeeded"),
                                  ("stop", cmd_stop, "stop a job (its MLflow run ends KILLED)")):
        verb = commands.add_parser(name, help=help_text, parents=[verbosity])
        verb.add_argument("job", help="the job id that `lmforge submit` printed")
        verb.add_argument("--address", help=address_help)
        if name == "logs":
            verb.add_argument("--follow", "-f", action="store_true", help="stream until the job ends")
        verb.set_defaults(func=func)
    listing = commands.add_parser("list", help="the cluster's lmforge jobs: state, start time, run",
                                  parents=[verbosity])
    listing.add_argument("--address", help=address_help)
    listing.set_defaults(func=cmd_list)
