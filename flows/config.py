"""Pipeline configuration from the command line: a YAML file merged with ``--set key=value`` overrides, validated
into the parameter models with one-line errors (``UserError``: printed by the CLI with exit status 2)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from schemas.params.presets import merge


class UserError(Exception):
    """Bad input: printed as one line, exit status 2."""


# --- config ---------------------------------------------------------------------------------------------
def parse_sets(pairs: list[str]) -> dict[str, Any]:
    """["a.b=1", "c=[x, y]"] -> {"a": {"b": 1}, "c": ["x", "y"]} (values parsed as YAML)."""
    import yaml

    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise UserError(f"--set expects key=value, got {pair!r}")
        key, raw = pair.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            raise UserError(f"--set {key}: value {raw!r} is not valid YAML: {e}") from None
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"--set {key}: {part!r} is set both as a value and as a section")
        node[parts[-1]] = value
    return out


deep_merge = merge  # one nested merge for configs, --set overrides and the presets (schemas.params.presets)


def load_config(path: str | None, sets: list[str]) -> dict[str, Any]:
    import yaml

    data: dict[str, Any] = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"config file {path} does not exist")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise UserError(f"config file {path} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise UserError(f"config file {path} must hold a mapping of parameters")
    return deep_merge(data, parse_sets(sets))


def validation_message(e, section: str | None = None) -> str:
    """One line naming each bad parameter by its dotted key as ``run --set`` spells it (``section`` prefixes
    the keys of a stage's own parameters, so ``turntree stage`` words an error as ``turntree run`` does)."""
    parts = []
    for err in e.errors():
        loc = ".".join(str(x) for x in ((section,) if section else ()) + tuple(err["loc"])) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown parameter"
        parts.append(f"{loc}: {msg}")
    return "bad parameters: " + "; ".join(parts)


def build(model_cls, data: dict[str, Any]):
    from pydantic import ValidationError

    try:
        return model_cls.model_validate(data)
    except ValidationError as e:
        raise UserError(validation_message(e)) from None
