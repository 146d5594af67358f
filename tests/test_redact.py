"""Credentials never reach a log, the console or MLflow, wherever in a value they hide; configuration stays readable."""

import pytest

from orchestrator.redact import REDACTED, redact_config, redact_value

AWS_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0In0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U"


@pytest.mark.parametrize(("text", "secret", "kept"), [
    # Authorization headers, in the notations they come in.
    (f"curl -H 'Authorization: Bearer {JWT}' https://api.example.com", JWT, "https://api.example.com"),
    ('{"Authorization": "Basic dXNlcjpodW50ZXIy", "Accept": "json"}', "dXNlcjpodW50ZXIy", '"Accept": "json"'),
    ("authorization=token ghs_0123456789", "ghs_0123456789", "authorization="),
    ("Proxy-Authorization: Basic Zm9vOmJhcg==", "Zm9vOmJhcg==", "Proxy-Authorization: "),
    ("Authorization: AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20240101, Signature=fe5f80f77d5f", "fe5f80f77d5f",
     "Authorization: "),
    # A bearer token without its header.
    (f"request failed (Bearer {JWT})", JWT, "request failed (Bearer "),
    # Credentials in URLs, including an unescaped "@" in the password and a token as the user name.
    ("https://alice:hunter2@git.example.com/repo.git", "hunter2", "@git.example.com/repo.git"),
    ("https://alice:p@ss@db.example.com:5432/x", "ss@db", "@db.example.com:5432/x"),
    ("pip install git+https://ghp_token12345@github.com/org/repo", "ghp_token12345", "@github.com/org/repo"),
    # AWS access key ids (long-term and temporary) and secret access keys wherever they appear.
    ("key id AKIAIOSFODNN7EXAMPLE in use", "AKIAIOSFODNN7EXAMPLE", "key id "),
    ("ASIAY34FZKBOKMUTVV7A expired", "ASIAY34FZKBOKMUTVV7A", " expired"),
    (f"aws_secret_access_key={AWS_SECRET}", AWS_SECRET, "aws_secret_access_key="),
    (f"env AWS_SECRET_ACCESS_KEY={AWS_SECRET} python train.py", AWS_SECRET, " python train.py"),
    (f'{{"AccessKeyId": "x", "SecretAccessKey": "{AWS_SECRET}", "Region": "eu"}}', AWS_SECRET, '"Region": "eu"'),
    (f"aws_session_token: '{AWS_SECRET}'", AWS_SECRET, "aws_session_token: '"),
    ('password="two words" done', "two words", " done"),
])
def test_each_secret_form_is_masked_and_its_context_kept(text, secret, kept):
    masked = redact_value(text)
    assert secret not in masked
    assert REDACTED in masked
    assert kept in masked


@pytest.mark.parametrize("text", [
    "<|endoftext|>", "eos_token: <|endoftext|>", "text_key=content", "data.text_field=text",
    "https://huggingface.co/gpt2/resolve/main/tokenizer.json", "s3://bucket/lmforge/runs", "http://127.0.0.1:5000",
    "mail alice@example.com", "bearer instruments", "tokens_per_second: 9150", "max_tokens=2048",
    "pad_token_id=0",
])
def test_ordinary_values_are_left_alone(text):
    assert redact_value(text) == text


def test_redact_config_masks_secret_keys_and_values_in_a_deep_copy():
    config = {
        "data": {"text_key": "content", "tokenizer": {"eos_token": "<|endoftext|>"}, "max_tokens": 2048,
                 "paths": ["s3://bucket/a", "https://u:pw@host.example.com/b"]},
        "tracking": {"tracking_uri": "https://user:hunter2@mlflow.example.com", "headers": None},
        "runtime_env": {"env_vars": {"HF_TOKEN": "hf_x", "WANDB_API_KEY": "k", "PATH": "/usr/bin",
                                     "HF_HUB_TOKEN": ""}},
        "credentials": {"user": "alice", "password": "pw"},
        "hardware": {"zero_stage": 2, "use_gpu": False, "peak_flops_per_worker": None},
        "notes": ("run with AWS_SECRET_ACCESS_KEY=abc123",),
    }
    before = repr(config)
    redacted = redact_config(config)
    assert repr(config) == before, "the input is not changed"
    assert redacted["data"] == {"text_key": "content", "tokenizer": {"eos_token": "<|endoftext|>"},
                                "max_tokens": 2048, "paths": ["s3://bucket/a", f"https://{REDACTED}@host.example.com/b"]}
    assert redacted["tracking"] == {"tracking_uri": f"https://{REDACTED}@mlflow.example.com", "headers": None}
    assert redacted["runtime_env"]["env_vars"] == {"HF_TOKEN": REDACTED, "WANDB_API_KEY": REDACTED,
                                                   "PATH": "/usr/bin", "HF_HUB_TOKEN": ""}
    assert redacted["credentials"] == {"user": REDACTED, "password": REDACTED}
    assert redacted["hardware"] == {"zero_stage": 2, "use_gpu": False, "peak_flops_per_worker": None}
    assert redacted["notes"] == (f"run with AWS_SECRET_ACCESS_KEY={REDACTED}",)
