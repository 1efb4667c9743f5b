"""Secrets never shown: masking credentials in config params, tags and log lines.

Pure (no MLflow, no I/O): used by MLflow tracking (params and tags), by the configuration
fingerprint, and by :class:`RedactingFilter` on every log handler we or MLflow print through.
"""

from __future__ import annotations

import logging
import re
from typing import Any

REDACTED = "***"

# Words (of a key split on ``_ - .`` and camelCase) that make its value a secret ...
_SECRET_WORDS = {"password", "passwd", "pwd", "passphrase", "secret", "secrets", "credential", "credentials",
                 "token", "apikey", "auth", "authorization", "bearer", "cookie", "privatekey", "sessionkey",
                 "dsn"}
# ... or pairs of consecutive words.
_SECRET_PAIRS = {("api", "key"), ("access", "key"), ("secret", "key"), ("private", "key"), ("session", "key"),
                 ("client", "secret"), ("account", "key"), ("ssh", "key"), ("signing", "key"), ("encryption", "key"),
                 ("sas", "url"), ("connection", "string")}
# "<x>_token" is a tokenizer setting, not a secret, for these <x>.
_TOKENIZER_WORDS = {"pad", "eos", "bos", "unk", "sep", "cls", "mask", "special", "im", "start", "end", "stop",
                    "chat", "max", "new", "num", "min"}
_URI_CREDENTIALS = re.compile(r"(://)([^/\s:@]+):([^/\s@]+)@")
_QUERY_SECRET = re.compile(r"([?&;](?:password|passwd|pwd|token|secret|api[_-]?key|access[_-]?key|sig|"
                           r"signature|x-amz-signature|x-amz-credential)=)[^&;\s]+", re.I)
_SECRET_VALUE = re.compile(
    r"\b(hf_[A-Za-z0-9]{20,}|AKIA[0-9A-Z]{16}|ASIA[0-9A-Z]{16}|gh[pousr]_[A-Za-z0-9]{20,}|github_pat_\w{20,}|"
    r"sk-[A-Za-z0-9_-]{20,}|xox[abprs]-[A-Za-z0-9-]{10,}|glpat-[A-Za-z0-9_-]{20,})\b"
    r"|((?i:bearer|basic)\s+)[A-Za-z0-9._~+/=-]{8,}")


def _key_words(key: str) -> list[str]:
    last = key.rsplit(".", 1)[-1]
    last = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", last)
    return [w for w in re.split(r"[^A-Za-z0-9]+", last.lower()) if w]


def is_secret_key(key: str) -> bool:
    """Whether a (flattened) param/tag key names a secret: ``hf_token``, ``db.password``, ``awsSecretAccessKey``."""
    words = _key_words(key)
    for i, w in enumerate(words):
        if w in _SECRET_WORDS:
            if w == "token" and i > 0 and words[i - 1] in _TOKENIZER_WORDS:
                continue
            return True
        if i and (words[i - 1], w) in _SECRET_PAIRS:
            return True
    return "".join(words) in {"apikey", "accesskey", "secretkey", "privatekey", "accesskeyid"} or \
        any(w.endswith(("password", "passwd", "secret", "apikey")) for w in words)


def redact_value(value: Any) -> Any:
    """Mask credentials inside a value: ``user:pw@`` in URIs, secret query parameters, known token shapes."""
    if not isinstance(value, str):
        if isinstance(value, (list, tuple)):
            return type(value)(redact_value(v) for v in value)
        return value
    value = _URI_CREDENTIALS.sub(rf"\1{REDACTED}@", value)
    value = _QUERY_SECRET.sub(rf"\1{REDACTED}", value)
    return _SECRET_VALUE.sub(lambda m: (m.group(2) or "") + REDACTED, value)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def redact(params: dict[str, Any]) -> dict[str, Any]:
    """Flat params with secrets replaced by ``***`` (by key name, and credentials inside values)."""
    return {k: REDACTED if is_secret_key(k) and v not in (None, "") else redact_value(v) for k, v in params.items()}


def config_params(config: Any) -> dict[str, Any]:
    """A stage config (pydantic model or dict) as flat, redacted params."""
    if hasattr(config, "model_dump"):
        config = config.model_dump(mode="json")
    return redact(flatten(dict(config)))


class RedactingFilter(logging.Filter):
    """Masks credentials in every record a handler emits (message and arguments, once formatted)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a record that cannot format stays as it is
            return True
        clean = redact_value(message)
        if clean != message:
            record.msg, record.args = clean, None
        return True


def install_log_redaction(*loggers: str) -> None:
    """Add :class:`RedactingFilter` to the handlers of the root logger and of ``loggers`` (e.g. ``mlflow``)."""
    for name in ("", *loggers):
        for handler in logging.getLogger(name).handlers:
            if not any(isinstance(f, RedactingFilter) for f in handler.filters):
                handler.addFilter(RedactingFilter())
