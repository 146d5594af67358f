"""Recognise and mask credentials before anything reaches a log, a console or MLflow."""

import re

REDACTED = "***"

SECRET_WORDS = {"password", "passwd", "pwd", "secret", "secrets", "credential", "credentials", "apikey",
                "accesskey", "privatekey", "auth", "authorization", "cookie"}
# "key" alone is too common (text_key, sort_key); it is a secret only after one of these words.
KEY_QUALIFIERS = {"api", "access", "secret", "private", "auth", "encryption", "signing", "client", "account",
                  "ssh", "master", "license", "sas", "service"}
# "token" is also a vocabulary word (eos_token, pad_token_id); those are configuration, not credentials.
VOCAB_WORDS = {"eos", "bos", "pad", "unk", "sep", "cls", "mask", "special", "start", "end", "id", "ids"}
URI_USERINFO = re.compile(r"([a-zA-Z][\w+.-]*://)[^\s/@]+@")
SECRET_QUERY = re.compile(
    r"([?&][\w.-]*(?:token|secret|password|passwd|signature|sig|credential|key|auth)[\w.-]*=)[^&\s#'\"]+",
    re.IGNORECASE)
# Well-known credential shapes (Hugging Face, OpenAI, GitHub, AWS access key id, Slack, Google API key).
TOKEN_SHAPES = re.compile(r"\b(?:hf_[A-Za-z0-9]{30,}|sk-[\w-]{20,}|gh[pousr]_[A-Za-z0-9]{30,}|github_pat_\w{20,}"
                          r"|AKIA[0-9A-Z]{16}|xox[abprs]-[\w-]{10,}|AIza[\w-]{35})")


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
    """Mask credentials inside a string: user:pass@ in URIs, secret query parameters, known token shapes."""
    text = URI_USERINFO.sub(rf"\g<1>{REDACTED}@", text)
    text = SECRET_QUERY.sub(rf"\g<1>{REDACTED}", text)
    return TOKEN_SHAPES.sub(REDACTED, text)
