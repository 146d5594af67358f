"""Recognise and mask credentials before anything reaches a log, a console or MLflow."""

import copy
import re
from collections.abc import Mapping

REDACTED = "***"

SECRET_WORDS = {"password", "passwd", "pwd", "secret", "secrets", "credential", "credentials", "apikey",
                "accesskey", "privatekey", "auth", "authorization", "cookie"}
# "key" alone is too common (text_key, sort_key); it is a secret only after one of these words.
KEY_QUALIFIERS = {"api", "access", "secret", "private", "auth", "encryption", "signing", "client", "account",
                  "ssh", "master", "license", "sas", "service"}
# "token" is also a vocabulary word (eos_token, pad_token_id); those are configuration, not credentials.
VOCAB_WORDS = {"eos", "bos", "pad", "unk", "sep", "cls", "mask", "special", "start", "end", "id", "ids",
               "dtype", "vocab", "size", "count", "counts", "type", "types", "len", "length", "max", "min"}
# Everything between the scheme and the host's last "@": user:password, or a token used as the user name.
URI_USERINFO = re.compile(r"([a-zA-Z][\w+.-]*://)[^\s/?#@]+(?:@[^\s/?#@]+)*@")
SECRET_QUERY = re.compile(
    r"([?&][\w.-]*(?:token|secret|password|passwd|signature|sig|credential|key|auth)[\w.-]*=)[^&\s#'\"]+",
    re.IGNORECASE)
# An HTTP Authorization header in any notation (curl -H, a header dict, JSON): the rest of its value goes,
# whatever the scheme (Bearer, Basic, AWS4-HMAC-SHA256 Credential=..., Signature=...).
AUTH_HEADER = re.compile(r"""(\b(?:proxy-)?authorization["']?\s*[:=]\s*["']?)[^"'\r\n]+""", re.IGNORECASE)
# A bearer token on its own. A real one has a digit; that keeps prose ("bearer instruments") readable.
BEARER = re.compile(r"\b([Bb]earer\s+)(?=[\w.~+/-]*\d)[\w.~+/-]{8,}=*")
# name=value, name: value, "name": "value" inside a value (a command line, an env dump, JSON, a log line);
# the value is masked when the name is a secret's (is_secret_key), such as AWS_SECRET_ACCESS_KEY.
ASSIGNMENT = re.compile(r"""(?<![\w.-])([A-Za-z_][\w.-]*)(["']?\s*[:=]\s*)("[^"]*"|'[^']*'|[^\s"',;&}\]]+)""")
# Well-known credential shapes (Hugging Face, OpenAI, GitHub, AWS access key id, Slack, Google API key).
TOKEN_SHAPES = re.compile(r"\b(?:hf_[A-Za-z0-9]{30,}|sk-[\w-]{20,}|gh[pousr]_[A-Za-z0-9]{30,}|github_pat_\w{20,}"
                          r"|(?:AKIA|ASIA)[0-9A-Z]{16}|xox[abprs]-[\w-]{10,}|AIza[\w-]{35})")


def is_secret_key(path: str) -> bool:
    """True when any dotted component of `path` names a credential: api_key, HF_TOKEN, db.password."""
    for component in path.split("."):
        words = [w.lower() for w in re.split(r"[_\-\s]+|(?<=[a-z0-9])(?=[A-Z])", component) if w]
        if SECRET_WORDS.intersection(words):
            return True
        if "token" in words and not VOCAB_WORDS.intersection(words):
            return True
        if words == ["key"] or any(w == "key" and i > 0 and words[i - 1] in KEY_QUALIFIERS
                                   for i, w in enumerate(words)):
            return True
    return False


def redact_value(text: str) -> str:
    """Mask credentials inside a string, keeping what is around them: a URL's host and path, a key's name."""
    text = AUTH_HEADER.sub(rf"\g<1>{REDACTED}", text)
    text = BEARER.sub(rf"\g<1>{REDACTED}", text)
    text = URI_USERINFO.sub(rf"\g<1>{REDACTED}@", text)
    text = SECRET_QUERY.sub(rf"\g<1>{REDACTED}", text)
    text = ASSIGNMENT.sub(_mask_secret_assignment, text)
    return TOKEN_SHAPES.sub(REDACTED, text)


def _mask_secret_assignment(match: re.Match) -> str:
    name, separator, value = match.groups()
    if not is_secret_key(name) or value.strip("\"'") in ("", REDACTED):
        return match.group(0)
    quote = value[0] if value[0] in "\"'" else ""
    return f"{name}{separator}{quote}{REDACTED}{quote}"


def redact_config(values: Mapping, path: str = "") -> dict:
    """A deep copy of a nested config in which nothing is a credential.

    A set value under a secret's name (any dotted component, as is_secret_key reads it) becomes REDACTED,
    and every other string goes through redact_value; numbers, booleans and nulls are kept as they are.
    """
    return {key: _redact_item(value, f"{path}.{key}" if path else str(key)) for key, value in values.items()}


def _redact_item(value, path: str):
    if isinstance(value, Mapping):
        return redact_config(value, path)
    if isinstance(value, list | tuple):
        return type(value)(_redact_item(item, path) for item in value)
    if is_secret_key(path) and value not in (None, ""):
        return REDACTED
    return redact_value(value) if isinstance(value, str) else copy.deepcopy(value)
