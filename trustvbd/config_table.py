"""One TOML table of the config being checked: typed getters that name the file and key
when a value is wrong, and the values every section shares (names, labels, paths)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from trustvbd.config import ConfigError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class Table:
    """A TOML table being validated: typed getters that name the file and key on error."""

    def __init__(self, file: Path, where: str, data: Any, allowed: set[str]) -> None:
        self.file, self.where = file, where
        if not isinstance(data, dict):
            section = f"[[{where.partition('[')[0]}]]" if where.endswith("]") else f"[{where}]"
            raise ConfigError(file, where, f"found {json.dumps(data, default=str)}, where a table is"
                              f" expected: write a {section} section with its keys")
        self.data = data
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise ConfigError(
                file, self._key(unknown[0]),
                f"unknown key; allowed keys here are: {', '.join(sorted(allowed))}",
            )

    def _key(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def error(self, key: str, message: str) -> ConfigError:
        return ConfigError(self.file, self._key(key), message)

    def get(self, key: str, kind: type, required: bool = False, default: Any = None) -> Any:
        if key not in self.data:
            if required:
                raise self.error(key, "is missing; add it")
            return default
        value = self.data[key]
        if kind is str and not isinstance(value, str):
            raise self.error(key, f"must be a string, not {value!r}")
        if kind is bool and not isinstance(value, bool):
            raise self.error(key, f"must be true or false, not {value!r}")
        if kind is list and not isinstance(value, list):
            raise self.error(key, f"must be a list, not {value!r}")
        return value

    def name(self, key: str = "name") -> str:
        value = self.get(key, str, required=True)
        if not _NAME.match(value):
            raise self.error(
                key, f"{value!r} is not a valid name: use 1-64 letters, digits, '.', '_' or '-',"
                " starting with a letter or digit",
            )
        return value

    def path(self, key: str, base: Path) -> Path | None:
        value = self.get(key, str)
        if value is None:
            return None
        if not value:
            raise self.error(key, "is empty; give a path")
        if "\0" in value:  # the OS cannot take it: resolve() raised ValueError, a traceback
            raise self.error(key, f"{value!r} holds a NUL character (\\u0000), which no path "
                             "may hold; remove it")
        return (base / os.path.expanduser(value)).resolve()

    def label(self) -> str:
        """A policy label: what the access-control domain takes (refused there, it stopped
        `up` after the domains had started, with a message about the policy)."""
        value: str = self.get("label", str, required=True)
        if not value or len(value) > 256:
            raise self.error("label", f"{value!r} is {'empty' if not value else 'too long'}: give"
                             " a label of 1 to 256 characters, as the policy names it")
        if any(ord(ch) < 32 or ord(ch) == 127 for ch in value):
            raise self.error("label", f"{value!r} holds a control character; a label is a name "
                             "the policy gives (printed in logs and status): remove it")
        return value
