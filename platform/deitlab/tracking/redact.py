"""Keep credentials out of everything MLflow records: params, tags, JSON artifacts and reports.

Three rules, applied to every string before it is logged:
- values of the process's secret-looking environment variables (AWS_SECRET_ACCESS_KEY, RAY_AUTH_TOKEN,
  MLFLOW_TRACKING_PASSWORD, ...) are replaced wherever they appear;
- well-known secret shapes are replaced: AWS access key ids, passwords in URLs (`scheme://user:pass@host`),
  `token=` / `secret=` / `password=` query or key-value pairs, private-key blocks;
- a param or tag whose *name* looks secret (`api_token`, `db_password`) keeps its name, never its value.
Pure Python: the core and the adapters both use it.
"""
from __future__ import annotations

import os
import re
from typing import Any

REDACTED = "***"
_SECRET_NAME = re.compile(r"(secret|token|passw(or)?d|credential|private[_-]?key|access[_-]?key|api[_-]?key|auth)",
                          re.IGNORECASE)
# Names that match the pattern above but hold no secret: their values are ordinary words or ids.
_NOT_SECRET_ENV = frozenset({"RAY_AUTH_MODE", "AWS_ACCESS_KEY_ID_FILE", "MLFLOW_TRACKING_AUTH",
                             "AWS_REQUEST_CHECKSUM_CALCULATION"})
_MIN_SECRET_LENGTH = 6  # shorter environment values ("1", "true", "token") would redact ordinary text
_PATTERNS = (
    (re.compile(r"(?<![A-Z0-9])(?:AKIA|ASIA|AIDA|AROA)[A-Z0-9]{16}(?![A-Z0-9])"), REDACTED),  # AWS key ids
    (re.compile(r"([a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s:]+:[^/@\s]*@"), rf"\1{REDACTED}@"),  # user:pass@ in URLs
    (re.compile(r"((?:secret|token|passw(?:or)?d|api[_-]?key|access[_-]?key|session[_-]?token|signature)"
                r"[a-z_-]*\s*[=:]\s*)[^&\s,;\"']+", re.IGNORECASE), rf"\1{REDACTED}"),
    (re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?-----END [A-Z ]*PRIVATE KEY-----", re.DOTALL), REDACTED),
)


def secret_name(name: str) -> bool:
    """Whether a param, tag or variable name announces a secret."""
    return bool(_SECRET_NAME.search(name))


def _environment_secrets() -> list[str]:
    # list(os.environ) is one atomic copy of the names; .get() tolerates a variable that another thread (MLflow's
    # telemetry, Ray) removes meanwhile — iterating os.environ.items() raised KeyError here once.
    values = set()
    for key in list(os.environ):
        value = os.environ.get(key)
        if value and key not in _NOT_SECRET_ENV and secret_name(key) and len(value) >= _MIN_SECRET_LENGTH:
            values.add(value)
    return sorted(values, key=len, reverse=True)  # longest first: a secret containing another is redacted whole


def scrub(text: str) -> str:
    """`text` with every secret it contains replaced by ***."""
    for value in _environment_secrets():
        text = text.replace(value, REDACTED)
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def scrub_item(name: str, value: Any) -> str:
    """The string MLflow may record for the param or tag `name`."""
    if _secret_field(name.rsplit(".", 1)[-1]):  # a dotted param: its own name, not its section's
        return REDACTED
    return scrub("None" if value is None else str(value))


def _secret_field(key: str) -> bool:
    """Whether a param, tag or JSON key names a secret. Our own `token` fields (the distillation token) and
    `auth_mode` contain a secret word but hold none."""
    return secret_name(key) and key.rsplit(".", 1)[-1] not in {"token", "uses_token", "auth_mode"}


def scrub_tree(obj: Any) -> Any:
    """A JSON-like structure with secret values redacted (by key name and by value)."""
    if isinstance(obj, dict):
        return {k: (REDACTED if isinstance(k, str) and _secret_field(k) and isinstance(v, str) else scrub_tree(v))
                for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [scrub_tree(v) for v in obj]
    if isinstance(obj, str):
        return scrub(obj)
    return obj
