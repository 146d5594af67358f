"""What a sweep searches: Hydra sweep expressions parsed into swept keys, a Ray Tune search space, and the
trials' overrides, every one checked against the config schema before any trial starts."""

import itertools
import math
import shlex
from dataclasses import dataclass

from common.errors import ConfigError, LmforgeError

# Checking a config composes it with Hydra (a fraction of a second each); past this many combinations of
# the swept values, each value is checked once, with the other keys at their first value.
MAX_CHECKED_COMBINATIONS = 64


@dataclass
class Swept:
    """One swept key: `choice` lists its values; `interval` is a (low, high) range Tune samples from."""
    key: str  # a config key or a config group (model, data, ...)
    expression: str  # as the user wrote it, for messages
    choices: list | None = None  # choice(...) and range(...), in the order given
    interval: tuple[float, float] | None = None
    log: bool = False  # tag(log, ...): sample on a log scale
    integer: bool = False  # an interval over an integer config key samples integers

    def corners(self) -> list:
        """The values that decide whether every trial's config is valid: every choice, or both interval ends
        (an interval is half-open, like Python's range, for integers)."""
        if self.choices is not None:
            return list(self.choices)
        low, high = self.interval
        return [int(low), int(high) - 1] if self.integer else [low, high]


def split_overrides(overrides: list[str]) -> tuple[list[str], list[Swept]]:
    """(the ordinary overrides, the swept keys) of a command line, parsed with Hydra's own grammar."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser, fixed, swept = OverridesParser.create(), [], []
    for text in overrides:
        try:
            override = parser.parse_override(text)
        except HydraException as error:
            raise ConfigError(f"bad sweep expression {text!r}: {str(error).splitlines()[0]}") from None
        if override.is_sweep_override():
            swept.append(to_swept(override, text))
        else:
            fixed.append(text)
    return fixed, swept


def parse_expressions(expressions: list[str], where: str) -> list[Swept]:
    """The sweep expressions of a preset's sweep.params; each must sweep something."""
    fixed, swept = split_overrides(list(expressions))
    if fixed:
        raise ConfigError(f"{where}: {fixed[0]!r} is not a sweep expression; use choice(...), range(...) or "
                          "interval(...), or move it to the command line as an ordinary override")
    return swept


def to_swept(override, text: str) -> Swept:
    from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep

    sweep, key = override.value(), override.key_or_group
    if override.is_add() or override.is_delete() or override.is_force_add():
        raise ConfigError(f"bad sweep expression {text!r}: sweep existing keys only (no +, ++ or ~)")
    log = "log" in (sweep.tags or set())
    unknown_tags = (sweep.tags or set()) - {"log"}
    if unknown_tags:
        raise ConfigError(f"bad sweep expression {text!r}: unknown tag {sorted(unknown_tags)[0]!r}; "
                          "the one tag a sweep understands is log, as in tag(log,interval(1e-5,1e-3))")
    if isinstance(sweep, ChoiceSweep | RangeSweep):
        values = list(override.sweep_iterator())
        if not values:
            raise ConfigError(f"bad sweep expression {text!r}: it gives no values")
        if any(isinstance(v, dict | list) for v in values):
            raise ConfigError(f"bad sweep expression {text!r}: sweep plain values (numbers, strings, options)")
        if log:
            raise ConfigError(f"bad sweep expression {text!r}: tag(log, ...) applies to interval(...) only")
        return Swept(key, text, choices=values)
    if isinstance(sweep, IntervalSweep):
        low, high = float(sweep.start), float(sweep.end)
        if not low < high:
            raise ConfigError(f"bad sweep expression {text!r}: interval(low, high) needs low < high")
        if log and low <= 0:
            raise ConfigError(f"bad sweep expression {text!r}: a log interval needs low > 0")
        return Swept(key, text, interval=(low, high), log=log)
    raise ConfigError(f"bad sweep expression {text!r}: use choice(...), range(...) or interval(...)")


def merge(preset: list[Swept], given: list[Swept]) -> list[Swept]:
    """The preset's swept keys, with the command line's replacing any preset key it sweeps again."""
    keys = {s.key for s in given}
    return [s for s in preset if s.key not in keys] + given


def mark_integers(swept: list[Swept], base) -> None:
    """An interval over an integer key (model.n_embd) samples integers: Hydra's interval() is always float."""
    from omegaconf import OmegaConf

    structured = OmegaConf.structured(base)
    for s in swept:
        if s.interval is not None:
            current = OmegaConf.select(structured, s.key, default=None)
            s.integer = isinstance(current, int) and not isinstance(current, bool)


def override_value(value) -> str:
    """A value as Hydra reads it back identically on a command line (floats at full precision)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def trial_overrides(fixed: list[str], values: dict) -> list[str]:
    return list(fixed) + [f"{key}={override_value(value)}" for key, value in values.items()]


def train_command(fixed: list[str], values: dict) -> str:
    """The `lmforge train` command line that reruns one trial's config."""
    # run_name names the sweep; the rerun is a run of its own
    kept = [o for o in fixed if not is_sweep_setting(o) and o.split("=", 1)[0] != "run_name"]
    return "lmforge train " + " ".join(shlex.quote(o) for o in trial_overrides(kept, values))


def is_sweep_setting(override: str) -> bool:
    """sweep=<preset> and sweep.* settings: they shape the search, never a trial's training."""
    return override.lstrip("+~").split("=", 1)[0].split(".", 1)[0] == "sweep"


def tune_space(swept: list[Swept], search: str) -> dict:
    """Ray Tune's search space, keyed by the config key each value overrides."""
    from ray import tune

    space = {}
    for s in swept:
        if search == "grid":
            if s.choices is None:
                raise ConfigError(f"{s.expression}: sweep.search=grid runs every combination, which an interval "
                                  "does not have; use choice(...)/range(...), or sweep.search=random or optuna")
            space[s.key] = tune.grid_search(s.choices)
        elif s.choices is not None:
            space[s.key] = tune.choice(s.choices)
        elif s.integer:
            low, high = int(s.interval[0]), int(s.interval[1])
            space[s.key] = tune.lograndint(low, high) if s.log else tune.randint(low, high)
        else:
            low, high = s.interval
            space[s.key] = tune.loguniform(low, high) if s.log else tune.uniform(low, high)
    return space


def check_trials(fixed: list[str], swept: list[Swept]) -> int:
    """Compose and validate a trial config for every combination of the swept values (each choice, both
    interval ends), so an unknown key or a value out of range fails before any trial starts. Returns how
    many configs were checked."""
    from orchestrator.config import load_config

    kept = [o for o in fixed if not is_sweep_setting(o)]
    corners = [s.corners() for s in swept]
    if math.prod(len(c) for c in corners) <= MAX_CHECKED_COMBINATIONS:
        combinations = list(itertools.product(*corners))
    else:
        combinations = [tuple(c[0] for c in corners)]
        for i, values in enumerate(corners):
            combinations += [tuple(v if j == i else c[0] for j, c in enumerate(corners)) for v in values[1:]]
    for combination in combinations:
        values = dict(zip((s.key for s in swept), combination))
        try:
            load_config(trial_overrides(kept, values))
        except LmforgeError as error:
            shown = " ".join(f"{k}={override_value(v)}" for k, v in values.items())
            raise ConfigError(f"the sweep's trial {shown} is not a valid config: {error}") from None
    return len(combinations)


def describe(swept: list[Swept]) -> str:
    return ", ".join(s.expression for s in swept)
