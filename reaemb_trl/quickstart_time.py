"""How long the rest of the quickstart will take: after the first steps of each training stage, one line on stderr
with that stage's time left and the whole run's.

The stage itself: its measured seconds per step x its steps left. The stages after it: their times on a reference
CPU (REFERENCE_*: measured on a 2-core AMD EPYC with AVX2 only, fp32, the shipped settings on
MovieLens-100k), for this run's sizes, scaled by how much slower or faster than that CPU this machine ran LRCL's
steps (the one step that measures the machine well: an LLM forward and backward). An estimate: text-rich catalogues
cost more per step, which LRCL's steps see; the evaluation's cost is assumed linear in the interactions. Measured on
the 2-core Intel Xeon of the README: estimated 46.5 min after 3 LRCL steps, took 38.7.
"""

from __future__ import annotations

import math
import sys
import time
from typing import TYPE_CHECKING, Callable, Sequence

from transformers import TrainerCallback

if TYPE_CHECKING:
    from reaemb_trl.data.canonical import RecDataset
    from reaemb_trl.quickstart import QuickstartSettings

REFERENCE_STEP_SECONDS = {"lrcl": 4.5, "crrl": 5.0}  # 473 s / 106 LRCL steps; 403 s / 80 CRRL steps (+ yardstick)
REFERENCE_ITEM_SECONDS = 0.065  # one item into a table (the raw table: 110 s for 1,682 items)
REFERENCE_RUN_SECONDS = 264.0  # one downstream run on one core (2.2 min a run with 2 workers on 2 cores) ...
REFERENCE_INTERACTIONS = 100_000  # ... on MovieLens-100k's interactions
MEASURED_STEPS = 3


def later_stage_seconds(settings: QuickstartSettings, data: RecDataset, later: Sequence[str], cold: int,
                        tables: int, frozen_only: int = 0) -> float:
    """Reference-CPU seconds of the stages named in `later` that have not run yet (no marker in OUTPUT/.stages), for
    a run with `cold` cold items, `tables` item tables and `frozen_only` more tables evaluated frozen only."""
    interactions = sum(len(seq) for seq in data.sequences.values())
    runs = settings.eval_seeds * (1 + tables * (2 if settings.hybrid else 1) + frozen_only)  # id + tables (+ hybrid)
    seconds = {
        "crrl": planned_crrl_steps(settings, len(data.items) - cold) * REFERENCE_STEP_SECONDS["crrl"]
        + 2 * cold * REFERENCE_ITEM_SECONDS,  # the cold items into the LRCL and CRRL tables
        "export": len(data.items) * REFERENCE_ITEM_SECONDS,
        "evaluate": math.ceil(runs / max(settings.eval_workers, 1)) * REFERENCE_RUN_SECONDS
        * interactions / REFERENCE_INTERACTIONS,
    }
    return sum(seconds[name] for name in later if not (settings.output / ".stages" / f"{name}.json").exists())


def planned_crrl_steps(settings: QuickstartSettings, warm_items: int) -> int:
    """CRRL's steps: `max_steps` when set, else its epochs over the items it may train on."""
    config = settings.crrl_fields()
    if config["max_steps"] > 0:
        return config["max_steps"]
    rows = warm_items * (1 - config["eval_item_fraction"]) * config["num_generations"]
    return math.ceil(rows / config["per_device_train_batch_size"] * config["num_train_epochs"])


def time_left(seconds_per_step: float, steps_left: int, later_seconds: float, speed: float) -> tuple[float, float]:
    """(seconds left in this stage, seconds left in all): the stage's pace x its steps left, plus the later stages'
    reference seconds x `speed` (this machine's time / the reference CPU's)."""
    this = seconds_per_step * steps_left
    return this, this + speed * later_seconds


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


class TimeEstimate(TrainerCallback):
    """Prints the estimate once, after MEASURED_STEPS steps that follow the first step of this session (the first
    pays one-time costs: caches, CRRL's first catalogue table)."""

    def __init__(self, stage: str, later_seconds: float, speed: float | None = None,
                 clock: Callable[[], float] = time.monotonic):
        """`speed`: this machine's time / the reference CPU's; None measures it on this stage's steps. Only LRCL's
        steps measure it well (one LLM forward and backward each); a CRRL step is mostly suffix passes on cached
        prefixes, while the reference CRRL time includes its yardstick and tables, so CRRL passes LRCL's."""
        self.stage, self.later_seconds, self.speed, self.clock = stage, later_seconds, speed, clock
        self.start: tuple[int, float] | None = None
        self.printed = False

    def on_step_end(self, args, state, control, **kwargs):
        if self.printed or not state.is_world_process_zero:
            return
        now = self.clock()
        if self.start is None:
            self.start = (state.global_step, now)
            return
        steps = state.global_step - self.start[0]
        if steps < MEASURED_STEPS:
            return
        per_step = (now - self.start[1]) / steps
        speed = per_step / REFERENCE_STEP_SECONDS[self.stage] if self.speed is None else self.speed
        this, total = time_left(per_step, state.max_steps - state.global_step, self.later_seconds, speed)
        print(f"[quickstart] {self.stage}: {per_step:.2f} s/step; about {_duration(this)} left in this stage, "
              f"{_duration(total)} in all (later stages: a reference CPU's times x {speed:.2f}, "
              "reaemb_trl/quickstart_time.py)", file=sys.stderr, flush=True)
        self.printed = True
