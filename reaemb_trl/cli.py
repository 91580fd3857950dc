"""The `reaemb` command line. Heavy imports happen inside each command so `reaemb --help` stays fast."""

from __future__ import annotations

import typer

from reaemb_trl.data.cli import data_app
from reaemb_trl.encode_cli import encode_command
from reaemb_trl.evaluation.cli import evaluate_command
from reaemb_trl.export_cli import export_command
from reaemb_trl.hub import push_command
from reaemb_trl.quickstart import quickstart_command

app = typer.Typer(
    help="reaemb-trl: turn a causal LLM into an item-embedding generator for sequential recommendation.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(data_app, name="data")
app.command("evaluate")(evaluate_command)
app.command("export")(export_command)
app.command("encode")(encode_command)
app.command("quickstart")(quickstart_command)
app.command("push")(push_command)


if __name__ == "__main__":
    app()
