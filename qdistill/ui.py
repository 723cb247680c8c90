"""The terminal side of long work (rich), for the CLI, the demo, the benchmarks and a user's own scripts: the
library reports progress through callbacks (`train.loop.Events`) and warns through `logging`; this draws them."""

from __future__ import annotations

import contextlib

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True)


def make_progress(quiet: bool = False) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=quiet,
        transient=False,
    )


@contextlib.contextmanager
def progress_bars(quiet: bool = False):
    """A `progress(name, done, total, status="")` callback that draws a bar per name (a new one when a name
    comes back after its bar was full: the same phase of the next run); none when `quiet`."""
    with make_progress(quiet) as bars:
        ids: dict[str, int] = {}
        full: set[str] = set()

        def progress(name: str, done: int, total: int, status: str = "") -> None:
            if name not in ids or name in full:
                ids[name] = bars.add_task(name, total=total, completed=done, status=status)
            else:
                bars.update(ids[name], completed=done, total=total, status=status)
            (full.add if done >= total else full.discard)(name)

        yield progress
