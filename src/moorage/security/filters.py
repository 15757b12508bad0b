"""Content filters per model: deny/allow rules on inputs and outputs, e-mail and phone masking.

A rule is a keyword (case-insensitive, matched on word boundaries) or ``re:PATTERN``. A refused
input raises `ContentBlocked` (400 ``content_blocked``); a refused output is withheld by the caller
and flagged (``finish_reason: content_filter``). Masking runs before the rules, on both sides, so
the model never sees a masked address and a client never receives one.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping

from ..config import FilterSettings
from ..errors import ConfigError, ContentBlocked

EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}")
# international or national numbers of 7+ digits with the usual separators, e.g. +1 (555) 010-9999
PHONE = re.compile(r"(?<![\w+])\+?\d[\d ().-]{5,}\d(?!\w)")
HOLDBACK = 64  # characters a streamed output keeps back so a rule that spans tokens is still caught


def _compile(rules: list[str], where: str) -> re.Pattern | None:
    parts = []
    for rule in rules:
        if rule.startswith("re:"):
            try:
                re.compile(rule[3:])
            except re.error as exc:
                raise ConfigError(f"content filter {where}: bad pattern {rule!r}: {exc}") from None
            parts.append(f"(?:{rule[3:]})")
        elif rule.strip():
            parts.append(rf"(?<!\w){re.escape(rule.strip())}(?!\w)")
    return re.compile("|".join(parts), re.IGNORECASE) if parts else None


def _digits(match: re.Match) -> bool:
    return sum(c.isdigit() for c in match.group()) >= 7


class ContentFilter:
    def __init__(self, settings: FilterSettings, name: str = "") -> None:
        self.name = name
        self.settings = settings
        self.input_deny = _compile(settings.input_deny, f"{name}.input_deny")
        self.input_allow = _compile(settings.input_allow, f"{name}.input_allow")
        self.output_deny = _compile(settings.output_deny, f"{name}.output_deny")
        self.output_allow = _compile(settings.output_allow, f"{name}.output_allow")

    def mask(self, text: str) -> str:
        if self.settings.mask_email:
            text = EMAIL.sub("[EMAIL]", text)
        if self.settings.mask_phone:
            text = PHONE.sub(lambda m: "[PHONE]" if _digits(m) else m.group(), text)
        return text

    def check_input(self, text: str, where: str = "input") -> str:
        """The input as the model should see it (masked), or `ContentBlocked`."""
        text = self.mask(text)
        if self.input_deny is not None and self.input_deny.search(text):
            raise ContentBlocked(f"{where} was refused by the content filter of this model")
        if self.input_allow is not None and not self.input_allow.search(text):
            raise ContentBlocked(f"{where} is outside what the content filter of this model allows")
        return text

    def output_blocked(self, text: str, final: bool = True) -> bool:
        if self.output_deny is not None and self.output_deny.search(text):
            return True
        return final and self.output_allow is not None and not self.output_allow.search(text)

    @property
    def filters_output(self) -> bool:
        return bool(self.output_deny or self.output_allow or self.settings.mask_email or self.settings.mask_phone)


class Filters:
    """The filter of each model name: an exact name wins over a glob pattern."""

    def __init__(self, by_pattern: Mapping[str, FilterSettings]) -> None:
        self._filters = {p: ContentFilter(s, p) for p, s in by_pattern.items()}

    def for_model(self, name: str) -> ContentFilter | None:
        if name in self._filters:
            return self._filters[name]
        return next((f for p, f in self._filters.items() if fnmatch.fnmatchcase(name, p)), None)


class StreamFilter:
    """The output filter of one streamed generation: text is released with `HOLDBACK` characters
    kept back (cut at whitespace, so an address or a keyword is never split), or all of it at the
    end when an allow-list must see the whole output. Once a deny rule matches, nothing more is
    released and `blocked` is set."""

    def __init__(self, cfilter: ContentFilter) -> None:
        self.cfilter = cfilter
        self.text = ""
        self.released = 0
        self.blocked = False

    def push(self, text: str) -> str:
        if self.blocked:
            return ""
        self.text += text
        if self.cfilter.output_blocked(self.cfilter.mask(self.text), final=False):
            self.blocked = True
            return ""
        if self.cfilter.output_allow is not None:
            return ""
        cut = self.text.rfind(" ", self.released, max(self.released, len(self.text) - HOLDBACK))
        if cut <= self.released:
            return ""
        out, self.released = self.text[self.released : cut], cut
        return self.cfilter.mask(out)

    def finish(self) -> str:
        if self.blocked or self.cfilter.output_blocked(self.cfilter.mask(self.text), final=True):
            self.blocked = True
            return ""
        out, self.released = self.text[self.released :], len(self.text)
        return self.cfilter.mask(out)
