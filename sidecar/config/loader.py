"""Read a policy file into a SidecarConfig, reporting every error with its file and key path."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from sidecar.config.models import SidecarConfig


class ConfigError(Exception):
    """A policy file that cannot be used; `errors` holds one line per problem."""

    def __init__(self, path: str, errors: list[str]) -> None:
        self.path = path
        self.errors = errors
        super().__init__("\n".join(errors))


def _key_path(loc: tuple[int | str, ...]) -> str:
    parts: list[str] = []
    for item in loc:
        # pydantic adds the name of a union member or a validator tag; they are not keys.
        if isinstance(item, str) and (
            item.startswith(("function-", "literal["))
            or item
            in {"DefaultPriceConfig", "str", "tuple[str, ...]", "token-count", "token-limits"}
        ):
            continue
        if isinstance(item, int):
            parts.append(f"[{item}]")
        else:
            parts.append(("." if parts else "") + item)
    return "".join(parts) or "(top level)"


# pydantic's phrasing, reworded for someone editing a YAML file.
_PHRASES = (
    (re.compile(r"^(Value|Assertion) error, "), ""),
    (re.compile(r"^Extra inputs are not permitted$"), "unknown key (check its spelling)"),
    (re.compile(r"^Field required$"), "required, but missing"),
    (re.compile(r"^Input should be a valid integer"), "must be a whole number"),
    (re.compile(r"^Input should be a valid (\w+)"), r"must be a \1"),
    (re.compile(r"^Input should be "), "must be "),
    (re.compile(r"^(String|List|Tuple|Dictionary) should have "), "must have "),
    (re.compile(r", unable to parse string as an? \w+$"), ""),
    (re.compile(r" after validation"), ""),
)


def plain_message(message: str) -> str:
    for pattern, replacement in _PHRASES:
        message = pattern.sub(replacement, message)
    return message


def parse_config(data: Any, source: str = "<config>") -> SidecarConfig:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(source, [f"{source}: (top level): must be a mapping of keys"])
    try:
        return SidecarConfig.model_validate(data)
    except ValidationError as exc:
        lines = []
        for err in exc.errors(include_url=False, include_input=False):
            message = plain_message(err["msg"])
            lines.append(f"{source}: {_key_path(tuple(err['loc']))}: {message}")
        raise ConfigError(source, sorted(set(lines), key=lines.index)) from None


def load_config(path: str | Path) -> SidecarConfig:
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(source, [f"{source}: cannot read: {exc.strerror}"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown position"
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(source, [f"{source}: {where}: invalid YAML: {problem}"]) from None
    return parse_config(data, source)


def redact_url(url: str) -> str:
    """A store URL as it may be printed: any password becomes **********."""
    return re.sub(r"(://[^:/@]*:)[^@/]*@", r"\1**********@", url)
