"""The ``corral`` command: the user CLI plus ``corral agent`` (the daemon).

This is the composition root of the command line: the CLI itself never imports server code,
and the agent's heavy imports happen only when ``corral agent`` runs.
"""

from __future__ import annotations

from corral.cli import app
from corral.cli import main as cli_main
from corral.daemon.command import add_agent_command

__all__ = ["main"]


def main() -> None:
    add_agent_command(app)
    cli_main()


if __name__ == "__main__":
    main()
