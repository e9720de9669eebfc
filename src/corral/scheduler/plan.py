"""The scheduler's answer for one VM, with everything ``corral vm why`` shows.

A :class:`Plan` names the chosen host (or None) and explains every host of the snapshot:

* a rejected host has the ``filter`` that rejected it (the filter module's ``NAME``, e.g.
  ``memory``) and a sentence starting with that module's ``REASON_*`` constant
  (``insufficient memory (needs 512 MiB, 96 free)``); only the first failing filter is kept;
* a feasible host has one score in [0, 1] per scorer that counted (``spread``, ``priority``…),
  the scorers' ``weights`` and its weighted ``total``; the highest total wins, ties going to
  the host name first in sort order.

``rows()`` lays that out as one :class:`PlanRow` per host (chosen first, then feasible hosts
best first, then rejected hosts by name), which is the ``vm why`` table; ``as_dict()`` is the
same as plain JSON-able data, and ``explain()`` the one-sentence summary a loop logs.
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Literal

__all__ = ["Plan", "PlanRow"]

Outcome = Literal["chosen", "feasible", "rejected"]


@dataclass(frozen=True)
class PlanRow:
    """One host's line in ``vm why``: either ``filter``/``reason`` or ``scores``/``total``."""

    node: str
    outcome: Outcome
    filter: str | None = None
    reason: str = ""
    scores: dict[str, float] = field(default_factory=dict)
    total: float | None = None


@dataclass(frozen=True)
class Plan:
    """The chosen node (or None) with every other node's rejection or scores.

    Built by :func:`corral.scheduler.schedule`; the per-host dicts are computed on first use
    so that a placement that nobody asks to explain stays cheap.
    """

    vm: str
    node: str | None
    score: float = 0.0
    policy: str = "spread"
    # host -> (filter name, sentence), for every host that did not pass.
    rejections: dict[str, tuple[str, str]] = field(default_factory=dict)
    # Feasible hosts in snapshot order, and per scorer a column of scores in that order.
    feasible: tuple[str, ...] = ()
    columns: dict[str, list[float]] = field(default_factory=dict)
    totals: Sequence[float] = ()
    weights: dict[str, float] = field(default_factory=dict)

    @cached_property
    def rejected(self) -> dict[str, str]:
        """host -> why it was rejected (the sentence)."""
        return {n: why for n, (_, why) in self.rejections.items()}

    @cached_property
    def rejected_by(self) -> dict[str, str]:
        """host -> the name of the filter that rejected it."""
        return {n: f for n, (f, _) in self.rejections.items()}

    @cached_property
    def scores(self) -> dict[str, float]:
        """feasible host -> its weighted total."""
        return dict(zip(self.feasible, self.totals, strict=True))

    @cached_property
    def breakdown(self) -> dict[str, dict[str, float]]:
        """feasible host -> scorer name -> its (unweighted) score."""
        return {
            n: {s: col[k] for s, col in self.columns.items()} for k, n in enumerate(self.feasible)
        }

    def rows(self, limit: int | None = None) -> list[PlanRow]:
        """The ``vm why`` table: chosen, then feasible best first, then rejected by name.

        With ``limit``, only the ``limit`` best feasible hosts and the first ``limit`` hosts
        (by name) each filter rejected are kept: see :meth:`omitted` for what is left out."""
        key = lambda kv: (-kv[1], kv[0])  # noqa: E731 - best total first, then by name
        scores = self.scores
        if limit is None or len(scores) <= limit:
            fit = sorted(scores.items(), key=key)
        else:
            fit = heapq.nsmallest(limit, scores.items(), key=key)
        columns = self.columns.items()
        position = {n: k for k, n in enumerate(self.feasible)} if fit else {}
        rows = [
            PlanRow(
                n,
                "chosen" if n == self.node else "feasible",
                scores={s: col[position[n]] for s, col in columns},
                total=total,
            )
            for n, total in fit
        ]
        kept: Counter[str] = Counter()
        for n, (f, why) in sorted(self.rejections.items()):
            if limit is None or kept[f] < limit:
                kept[f] += 1
                rows.append(PlanRow(n, "rejected", filter=f, reason=why))
        return rows

    def omitted(self, limit: int) -> dict[str, Any] | None:
        """What ``rows(limit)`` leaves out: how many feasible hosts, and how many rejected
        hosts per filter; None when it keeps every host."""
        feasible = max(len(self.feasible) - limit, 0)
        rejected = {
            f: n - limit
            for f, n in Counter(f for f, _ in self.rejections.values()).items()
            if n > limit
        }
        if not feasible and not rejected:
            return None
        return {"feasible": feasible, "rejected": dict(sorted(rejected.items()))}

    def as_dict(self, limit: int | None = None) -> dict[str, Any]:
        """Plain data (str, float, lists, dicts) for storing or returning over the API.

        With ``limit``, the rows are those of ``rows(limit)`` and ``omitted`` says how many
        hosts were left out (a plan over 1,000 hosts is ~130 KB whole: too much to store for
        every VM)."""
        data = {
            "vm": self.vm,
            "node": self.node,
            "score": self.score,
            "policy": self.policy,
            "weights": dict(self.weights),
            "nodes": [
                {
                    "node": r.node,
                    "outcome": r.outcome,
                    "filter": r.filter,
                    "reason": r.reason,
                    "scores": r.scores,
                    "total": r.total,
                }
                for r in self.rows(limit)
            ],
        }
        if limit is not None and (left := self.omitted(limit)) is not None:
            data["omitted"] = left
        return data

    def explain(self) -> str:
        """One sentence: where the VM goes, or why it goes nowhere."""
        if self.node is not None:
            return f"placing vm {self.vm} on node {self.node} (score {self.score:.2f})"
        if not self.rejections:
            return f"vm {self.vm} cannot be placed: the cluster has no nodes"
        items = sorted(self.rejections.items())
        if len(items) <= 5:
            reasons = "; ".join(f"{n}: {why}" for n, (_, why) in items)
            return f"vm {self.vm} cannot be placed: {reasons}"
        # Many hosts: one clause per filter, most common first, with one example each.
        by_filter = Counter(f for _, (f, _) in items)
        example: dict[str, str] = {}
        for n, (f, why) in items:
            example.setdefault(f, f"{n}: {why}")
        parts = [f"{count} by {f} (e.g. {example[f]})" for f, count in by_filter.most_common()]
        return (
            f"vm {self.vm} cannot be placed on any of {len(items)} nodes: "
            f"rejected {', '.join(parts)}"
        )
