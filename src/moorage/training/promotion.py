"""Gated promotion: a challenger takes the production alias only when its test metric, on the same
test split, is at least production's (plus ``training.promotion_min_delta``; lower wins for a
loss). The decision and both metrics go to the audit log and the alias history either way."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import Settings


@dataclass
class PromotionDecision:
    accepted: bool
    reason: str
    metric: str
    challenger: str  # NAME:VERSION
    challenger_value: float
    production: str | None  # NAME:VERSION, None when nothing was in production
    production_value: float | None


def promote(
    settings: Settings,
    name: str,
    *,
    from_alias: str = "challenger",
    to_alias: str = "production",
    user: str,
    force: bool = False,
) -> PromotionDecision:
    """Move `to_alias` of `name` to the version `from_alias` points at if it passes the gate (or
    `force`); audited either way, with `user` as the actor."""
    raise NotImplementedError
