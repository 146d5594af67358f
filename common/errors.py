"""The one exception type for user mistakes; the CLI prints its message without a traceback."""


class LmforgeError(Exception):
    """A problem the user can fix: a bad config key, a missing file, an unreachable cluster."""


class ConfigError(LmforgeError):
    """A config that cannot be composed or fails validation, raised before anything starts."""


def require(ok: bool, key: str, value: object, allowed: str) -> None:
    """Raise a ConfigError naming `key`, its bad `value` and what would be accepted."""
    if not ok:
        raise ConfigError(f"{key}={value!r} is not allowed; expected {allowed}")


class BadRecord(ValueError):
    """A fine-tuning record a task cannot use. The message says what is wrong with it, not where: the data
    preparation that knows the file and line adds that, or counts the record as skipped (data.lenient)."""
