"""Model references: ``NAME``, ``NAME@ALIAS`` and ``NAME:VERSION``.

A reference is parsed once, at the edge, into a `ModelRef`; everything below works with that.
Names and aliases are restricted to a small alphabet so that they are always safe as path parts
of an artifact store and as URL path segments (no ``..``, no slashes, no hidden files).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import InvalidName, InvalidReference

DEFAULT_ALIAS = "production"
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")
_ALIAS_RE = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")


def validate_name(name: str, what: str = "model") -> str:
    """Return `name` if it is a valid name of a model (or of another `what`, e.g. a dataset: the
    same rule), else raise `InvalidName` saying why."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or ".." in name:
        raise InvalidName(
            f"invalid {what} name {name!r}: use 1-63 lowercase letters, digits, '-', '_' or '.', "
            "starting with a letter or digit (no '..', no '/')"
        )
    return name


def validate_alias(alias: str) -> str:
    if not isinstance(alias, str) or not _ALIAS_RE.fullmatch(alias):
        raise InvalidName(
            f"invalid alias {alias!r}: use 1-32 lowercase letters, digits, '-' or '_', "
            "starting with a letter (for example 'production' or 'staging')"
        )
    return alias


@dataclass(frozen=True, slots=True)
class ModelRef:
    """A parsed reference. At most one of `alias` and `version` is set."""

    name: str
    alias: str | None = None
    version: int | None = None

    def __str__(self) -> str:
        if self.version is not None:
            return f"{self.name}:{self.version}"
        if self.alias is not None:
            return f"{self.name}@{self.alias}"
        return self.name


def parse_ref(text: str) -> ModelRef:
    """Parse ``NAME``, ``NAME@ALIAS`` or ``NAME:VERSION``."""
    if not isinstance(text, str) or not text.strip():
        raise InvalidReference("empty model reference: use NAME, NAME@ALIAS or NAME:VERSION")
    text = text.strip()
    if "@" in text and ":" in text:
        raise InvalidReference(f"bad model reference {text!r}: use NAME, NAME@ALIAS or NAME:VERSION, not both")
    try:
        if "@" in text:
            name, alias = text.split("@", 1)
            return ModelRef(validate_name(name), alias=validate_alias(alias))
        if ":" in text:
            name, version = text.split(":", 1)
            return ModelRef(validate_name(name), version=parse_version(version))
        return ModelRef(validate_name(text))
    except InvalidName as exc:
        raise InvalidReference(f"bad model reference {text!r}: {exc.message}") from exc


def parse_version(text: str | int) -> int:
    try:
        version = int(text)
    except (TypeError, ValueError):
        version = 0
    if version < 1 or (isinstance(text, str) and not text.isdigit()):
        raise InvalidName(f"invalid version {text!r}: versions are whole numbers from 1")
    return version
