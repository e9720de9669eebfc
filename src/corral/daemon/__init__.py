"""``corral agent``: settings and the composition root that wires every layer together."""

from corral.daemon.settings import AgentSettings, load_settings

__all__ = ["AgentSettings", "load_settings"]
