"""The `reaemb` command line, one file per command. Heavy imports happen inside each command so `reaemb --help`
stays fast."""

from __future__ import annotations

import typer

from reaemb_trl.cli.data import data_app
from reaemb_trl.cli.encode import encode_command
from reaemb_trl.cli.evaluate import evaluate_command
from reaemb_trl.cli.export import export_command
from reaemb_trl.cli.push import push_command
from reaemb_trl.cli.quickstart import quickstart_command

app = typer.Typer(
    help="reaemb-trl: turn a causal LLM into an item-embedding generator for sequential recommendation.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


@app.callback()
def _main() -> None:
    # A SIGTERM from a scheduler cleans up temporary files as Ctrl-C does.
    from reaemb_trl.signals import sigterm_as_interrupt

    sigterm_as_interrupt()


app.add_typer(data_app, name="data")
app.command("evaluate")(evaluate_command)
app.command("export")(export_command)
app.command("encode")(encode_command)
app.command("quickstart")(quickstart_command)
app.command("push")(push_command)
