"""Leader-only loops; their side effects go only through fenced ``store.commit``."""

from corral.control.context import ControlSettings, LeaderContext
from corral.control.leader import LeaderLoops, run_leader

__all__ = ["ControlSettings", "LeaderContext", "LeaderLoops", "run_leader"]
