"""The `corral` command-line interface (Typer + Rich); it talks to the API only through
`corral.client`.

`app` is the root Typer app (add commands to it from other modules), `main()` runs it, and
`CliConfig` is the seam tests use: `CliRunner().invoke(app, args, obj=CliConfig(transport=...))`.
"""

from __future__ import annotations

from corral.cli.app import CorralGroup, app, main
from corral.cli.context import CliConfig, CliState, OutputFormat, get_state

__all__ = ["CliConfig", "CliState", "CorralGroup", "OutputFormat", "app", "get_state", "main"]
