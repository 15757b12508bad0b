"""Gated promotion: a challenger takes the production alias only when its test metric, on the same
test split, is at least production's (plus ``training.promotion_min_delta``; lower wins for a
loss). The decision and both metrics go to the audit log, and into the alias history's reason when
the alias moves.

"The same test split" means the same dataset digest and split digest: when production was tested
on another split (an older dataset version, or it was registered by hand), it is evaluated now on
the challenger's split, through the runtime."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from ..config import Settings
from ..errors import BadRequest, ModelNotFound
from ..refs import ModelRef, validate_alias, validate_name
from ..registry import Registry, VersionInfo
from ..security.audit import AuditEntry, AuditLog
from .pipeline import evaluate_version

LOWER_IS_BETTER = ("loss", "perplexity")


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
    validate_name(name), validate_alias(from_alias), validate_alias(to_alias)
    registry = Registry.from_settings(settings).acting_as(user)
    try:
        challenger = registry.resolve(ModelRef(name, alias=from_alias))
        production = _target(registry, name, to_alias)
        metric = _metric(settings, challenger)
        decision = _decide(settings, challenger, production, metric, to_alias)
        if force and not decision.accepted:
            decision.accepted, decision.reason = True, f"forced by {user} past the gate ({decision.reason})"
        if decision.accepted and (production is None or production.version != challenger.version):
            registry.set_alias(name, to_alias, challenger.version, decision.reason)
        _audit(settings, registry, user, decision, from_alias, to_alias, force)
        return decision
    finally:
        registry.close()


def lower_is_better(metric: str) -> bool:
    return metric in LOWER_IS_BETTER or metric.endswith("_loss")


def _target(registry: Registry, name: str, alias: str) -> VersionInfo | None:
    try:
        return registry.resolve(ModelRef(name, alias=alias))
    except ModelNotFound as exc:
        if exc.code == "alias_not_found":
            return None
        raise


def _metric(settings: Settings, challenger: VersionInfo) -> str:
    """The gate's metric: ``training.promotion_metric``; a language model without it goes by loss."""
    metric = settings.training.promotion_metric
    if metric not in challenger.manifest.metrics and challenger.task == "generate":
        return "loss"
    return metric


def _decide(
    settings: Settings, challenger: VersionInfo, production: VersionInfo | None, metric: str, to_alias: str
) -> PromotionDecision:
    value = _test_value(challenger, metric)
    if production is None:
        reason = f"{challenger.ref} promoted to {to_alias}: none was there before (test {metric} {value:.4f})"
        return PromotionDecision(True, reason, metric, challenger.ref, value, None, None)
    if production.version == challenger.version:
        reason = f"{challenger.ref} is already {to_alias}"
        return PromotionDecision(True, reason, metric, challenger.ref, value, production.ref, value)
    split = challenger.manifest.metrics["evaluated_on"]
    current = _value_on(settings, production, metric, split)
    delta = settings.training.promotion_min_delta
    lower = lower_is_better(metric)
    accepted = value <= current - delta if lower else value >= current + delta
    if lower:
        rule = f"at most {production.ref}'s {current:.4f}" + (f" - {delta:g}" if delta else "")
    else:
        rule = f"at least {production.ref}'s {current:.4f}" + (f" + {delta:g}" if delta else "")
    where = f"on {split['dataset']} split {split['split']}"
    verdict = "promoted" if accepted else "not promoted"
    reason = f"{challenger.ref} {verdict} to {to_alias}: test {metric} {value:.4f} {where}, needed {rule}"
    return PromotionDecision(accepted, reason, metric, challenger.ref, value, production.ref, current)


def _test_value(info: VersionInfo, metric: str) -> float:
    metrics = info.manifest.metrics
    value = metrics.get(metric)
    if not isinstance(value, (int, float)) or "evaluated_on" not in metrics:
        raise BadRequest(
            f"{info.ref} has no test {metric!r} to compare: train it with `moorage train`, which tests it",
            code="no_test_metric",
        )
    return float(value)


def _value_on(settings: Settings, production: VersionInfo, metric: str, split: dict[str, Any]) -> float:
    """Production's metric on the challenger's split: its own test metric when it was tested on the
    very same split, else evaluated now."""
    own = production.manifest.metrics.get("evaluated_on") or {}
    same = own.get("split_sha256") == split["split_sha256"] and own.get("dataset_sha256") == split["dataset_sha256"]
    value = production.manifest.metrics.get(metric) if same else None
    if not isinstance(value, (int, float)):
        value = evaluate_version(settings, production.ref, split["dataset"], split["split"]).get(metric)
    if not isinstance(value, (int, float)) or math.isnan(value):
        raise BadRequest(f"{production.ref} has no {metric!r} on {split['dataset']}", code="no_test_metric")
    return float(value)


def _audit(
    settings: Settings,
    registry: Registry,
    user: str,
    decision: PromotionDecision,
    from_alias: str,
    to_alias: str,
    force: bool,
) -> None:
    if not settings.security.audit:
        return
    version = int(decision.challenger.rsplit(":", 1)[1])
    detail = {**asdict(decision), "from": from_alias, "to": to_alias, "force": force}
    detail["min_delta"] = settings.training.promotion_min_delta
    entry = AuditEntry(
        key_id=user, action="promote", status=0, model=decision.challenger.split(":")[0], version=version, detail=detail
    )
    AuditLog(registry.catalog).append([entry])
