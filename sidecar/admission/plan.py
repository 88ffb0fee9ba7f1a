"""The buckets a request is counted in: a request's dimensions, the rules' buckets for
them, and those buckets merged into what the store sees."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from sidecar.model import Identity
from sidecar.policy.rules import UNIT_OF, Context, Rule, Unit
from sidecar.shared_values import SharedValues
from sidecar.store.budget_types import BucketState, BucketView


# Slots: plans are cached per caller (up to PlanCache's bound), a dozen of these each, and
# an instance dict was about 100 bytes of every one.
@dataclass(frozen=True, slots=True)
class Planned:
    rule: Rule
    view: BucketView
    labels: Mapping[str, str]

    @property
    def bucket_label(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self.labels.items()) or "(all)"


def context(
    identity: Identity, model: str, provider: str, metadata: Mapping[str, str], requested: str = ""
) -> Context:
    """The request's dimensions. `model` is the canonical model (buckets are split by it);
    `requested`, the name as sent, is only for rule filters to match as well."""
    ctx: dict[str, tuple[str, ...]] = {
        "user": (identity.user,),
        "group": identity.groups,
        "token": (identity.token_name,) if identity.token_name else (),
        "kind": (identity.kind,),
        "model": (model,),
        "provider": (provider,),
    }
    if requested and requested != model:
        ctx["requested_model"] = (requested,)
    for key, value in metadata.items():
        ctx[f"metadata.{key}"] = (value,)
    return ctx


# What per-caller plans share: a bucket whose key names no caller (an unsplit rule's, a
# group's, a model's) is the same Planned in every caller's plan. Kept per rule and key,
# checked against the rule object (a reload makes new ones), and starting again when full.
_PER_CALLER = ("user", "token")
_shared_planned: dict[tuple[int, str], Planned] = {}
_SHARED_PLANNED_BOUND = 4096


def _planned(rule: Rule, view: BucketView, labels: Mapping[str, str]) -> Planned:
    if any(dim in labels for dim in _PER_CALLER):
        return Planned(rule, view, labels)
    key = (id(rule), view.key)
    found = _shared_planned.get(key)
    if found is not None and found.rule is rule and found.view == view:
        return found
    if len(_shared_planned) >= _SHARED_PLANNED_BOUND:
        _shared_planned.clear()
    found = _shared_planned[key] = Planned(rule, view, labels)
    return found


def plan(rules: Sequence[Rule], ctx: Context, now: float) -> list[Planned]:
    planned = []
    for rule in rules:
        buckets = rule.buckets(ctx)
        if not buckets:
            continue
        # Once per rule, not per bucket: a group split gives one bucket per group.
        window = rule.window
        slot, since, ttl = window.slot(now), window.since(now), window.ttl_seconds()
        enforce = rule.action != "monitor"
        for key, labels in buckets:
            view = BucketView(key, slot, since, ttl, rule.limit, enforce, rule.measure)
            planned.append(_planned(rule, view, labels))
    return planned


# Equal values plans derive from their rules alone (every caller under the same rules has
# the same ones): one object kept for all the cached plans, instead of one per plan (about a
# kilobyte each).
_shared_names: SharedValues[tuple[str, ...]] = SharedValues(1024)
_shared_enforced: SharedValues[tuple[tuple[int, Unit, int], ...]] = SharedValues(1024)


_shared_positions: SharedValues[tuple[int, ...]] = SharedValues(1024)


# Slots, and no per-plan dict of bucket keys: plans are cached per caller (up to
# PlanCache's bound), and a plan's instance dict and key index were over a kilobyte each.
@dataclass(frozen=True, slots=True)
class Plan:
    """Planned buckets, and the distinct store buckets they map to.

    Several rules may name one bucket (the account limit and the always-on account tracking,
    say): the store sees it once, enforced if any rule enforces it, at the tightest limit.
    """

    planned: tuple[Planned, ...]
    views: tuple[BucketView, ...]
    # The index in `views` of each of `planned`'s buckets, in the same order.
    positions: tuple[int, ...]
    # What each decision reads of its plan besides the buckets, worked out once per plan:
    # the rules' names, sorted (every decision logs them) ...
    names: tuple[str, ...]
    # ... (index, unit, limit) of each enforced bucket ...
    enforced: tuple[tuple[int, Unit, int], ...]
    # ... and the planned buckets whose rule has alert thresholds (and a limit to reach).
    alerting: tuple[Planned, ...]

    def state(self, planned: Planned, states: Sequence[BucketState]) -> BucketState:
        for p, i in zip(self.planned, self.positions, strict=True):
            if p is planned:
                return states[i]
        key = planned.view.key
        return states[next(i for i, v in enumerate(self.views) if v.key == key)]

    def culprit(self, view_index: int) -> Planned:
        view = self.views[view_index]
        return next(
            p
            for p in self.planned
            if p.view.key == view.key and p.view.enforce and p.view.limit == view.limit
        )

    def rule_names(self) -> tuple[str, ...]:
        return self.names


def merge(planned: Sequence[Planned]) -> Plan:
    merged: dict[str, BucketView] = {}
    for p in planned:
        current = merged.get(p.view.key)
        if current is None or (
            p.view.enforce and (not current.enforce or p.view.limit < current.limit)
        ):
            merged[p.view.key] = p.view
    views = tuple(merged.values())
    index = {key: i for i, key in enumerate(merged)}
    # Equal values plans derive from their rules alone (every caller under the same rules
    # has the same ones): one object kept for all the cached plans, not one per plan.
    return Plan(
        tuple(planned),
        views,
        _shared_positions(tuple(index[p.view.key] for p in planned)),
        _shared_names(tuple(sorted({p.rule.name for p in planned}))),
        _shared_enforced(
            tuple(
                (i, UNIT_OF[view.measure], view.limit)
                for i, view in enumerate(views)
                if view.enforce
            )
        ),
        tuple(p for p in planned if p.rule.alerts and p.rule.limit > 0),
    )
