"""Credentials in URIs: never recorded, never accepted as a run root.

A URI can carry a secret in its user-info part (``s3://KEY:SECRET@bucket/…``,
``postgresql://user:password@host/db``, ``http://user:token@host``). Whatever turntree records (the run
manifest, MLflow parameters, tags and logged dicts, what a flow returns to Prefect) goes through ``redact`` /
``redact_all``, which replace the user-info of every such URI by ``***``; a run root with credentials in it is
refused outright (``credentials_error``): pyarrow would accept it, and it would then be written everywhere the
root is. Light: no imports beyond ``re``, so the CLI can check a root before anything else.
"""

from __future__ import annotations

import re
from typing import Any

# scheme://userinfo@ where userinfo holds a ':' (a password, or an access key and its secret)
_SECRET = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>[^/@\s:]*:[^/@\s]*)@")
# scheme://anything@ (user-info of any kind), for values that are URIs themselves
_USERINFO = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>[^/@\s]+)@")

REDACTED = "***"


def has_userinfo(uri: str) -> bool:
    """``uri`` names a user (and perhaps a secret) before its host: ``s3://KEY@bucket``, ``s3://K:S@bucket``."""
    return bool(_USERINFO.match(uri))


def redact(text: str) -> str:
    """``text`` with the user-info of every URI that carries a password replaced by ``***``."""
    if "://" not in text:
        return text
    return _SECRET.sub(lambda m: f"{m.group('scheme')}{REDACTED}@", text)


def without_userinfo(uri: str) -> str:
    """``uri`` with its user-info dropped (``http://u:p@host/x`` -> ``http://host/x``): a link to show."""
    return _USERINFO.sub(lambda m: m.group("scheme"), uri)


def redact_all(obj: Any) -> Any:
    """``redact`` applied to every string in a JSON-like structure (dict keys included)."""
    if isinstance(obj, str):
        return redact(obj)
    if isinstance(obj, dict):
        return {redact_all(k): redact_all(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(redact_all(v) for v in obj)
    return obj


def credentials_error(root: str, what: str = "run_root") -> str | None:
    """Why ``root`` cannot be a run root because it carries credentials (one line that does not repeat them),
    or None."""
    if not has_userinfo(root):
        return None
    shown = _USERINFO.sub(lambda m: f"{m.group('scheme')}{REDACTED}@", root)
    return (
        f"{what} {shown} has credentials in it (USER:SECRET@): they would be recorded in the manifest, MLflow and "
        "Prefect; remove them and give the store's keys as AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or "
        "AWS_PROFILE, or an instance or pod role) instead"
    )


class CredentialsInURI(ValueError):
    """A run root with credentials in it."""
