"""The `corral` command: the root Typer app, its global options, and `main()`.

Exit codes (every command, including ones other modules add to `app`):

    0  ok                          3  not found
    1  API or server error          4  conflict or precondition failed
       (also a failed task)         5  unavailable (server down, unreachable, no leader)
    2  usage error (bad flag or value; nothing was sent)

Other modules add commands with `app.command()(func)` or `app.add_typer(sub, name=...)`;
a `corral.client.CorralError` raised anywhere below the root is printed as
`error: <detail>` (plus field errors and the request id) and exits with its `exit_code`.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from corral.cli.cluster import cluster_app, node_app
from corral.cli.context import DEFAULT_ADDR, CliConfig, CliState, OutputFormat
from corral.cli.group import group_app
from corral.cli.migrate import attach_migrate_commands
from corral.cli.render import report_error
from corral.cli.snapshot import add_snapshot_commands
from corral.cli.storage import attach_disk_commands, image_app, pool_app, volume_app
from corral.cli.task import task_app
from corral.cli.template import template_app
from corral.cli.token import token_app
from corral.cli.vm import vm_app
from corral.client import CorralError

__all__ = ["CorralGroup", "app", "main"]


class CorralGroup(TyperGroup):
    """The root command group: maps `CorralError`s from any subcommand to exit codes."""

    def invoke(self, ctx: Any) -> Any:  # ctx: the vendored click Context typer passes
        try:
            return super().invoke(ctx)
        except CorralError as exc:
            report_error(exc)
            raise typer.Exit(exc.exit_code) from None


app = typer.Typer(
    name="corral",
    cls=CorralGroup,
    help="Drive a corral cluster: virtual machines, nodes and tasks.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.callback()
def root(
    ctx: typer.Context,
    addr: Annotated[
        str,
        typer.Option(
            "--addr",
            envvar="CORRAL_ADDR",
            metavar="URL",
            help="The corral API: host:port or http(s)://host:port.",
        ),
    ] = DEFAULT_ADDR,
    output: Annotated[
        OutputFormat,
        typer.Option(
            "-o",
            "--output",
            envvar="CORRAL_OUTPUT",
            case_sensitive=False,
            help="table (for people) or json (exactly the API's objects, for scripts).",
        ),
    ] = OutputFormat.TABLE,
) -> None:
    """Drive a corral cluster: virtual machines, nodes and tasks."""
    config = ctx.obj if ctx.obj is not None else CliConfig()
    if not isinstance(config, CliConfig):
        raise TypeError(f"the context object must be a CliConfig, not {type(config).__name__}")
    state = CliState(config, addr, output)
    ctx.obj = state
    ctx.call_on_close(state.close)


app.add_typer(cluster_app, name="cluster")
app.add_typer(node_app, name="node")
app.add_typer(vm_app, name="vm")
app.add_typer(task_app, name="task")
app.add_typer(token_app, name="token")
app.add_typer(group_app, name="group")
app.add_typer(pool_app, name="pool")
app.add_typer(volume_app, name="volume")
app.add_typer(image_app, name="image")
app.add_typer(template_app, name="template")
attach_disk_commands(vm_app)
add_snapshot_commands(vm_app)
attach_migrate_commands(vm_app, task_app)


def main() -> None:
    """Run `corral` on `sys.argv` and exit with the code from the table above."""
    app(prog_name="corral")
