"""Scorers: higher is better; each returns a score in [0, 1]."""

from corral.scheduler.rank.spread import spread

__all__ = ["spread"]
