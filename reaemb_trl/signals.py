"""SIGTERM (what SLURM, Kubernetes and `kill` send) handled like Ctrl-C.

Python's default for SIGTERM ends the process at once: no `finally` block runs, so temporary files and folders
stay behind. Turned into KeyboardInterrupt, it runs every cleanup path that Ctrl-C already runs.
"""

from __future__ import annotations

import signal
import threading


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"received signal {signal.Signals(signum).name}")


def sigterm_as_interrupt() -> None:
    """Make SIGTERM raise KeyboardInterrupt in the main thread (a no-op outside it: only the main thread may set
    signal handlers)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_interrupt)
