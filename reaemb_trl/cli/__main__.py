"""`python -m reaemb_trl.cli ...`: what `reaemb ...` runs (the processes of `reaemb export --num-processes N` too)."""

from reaemb_trl.cli import app

app(prog_name="reaemb")
