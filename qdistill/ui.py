"""Progress bars and tables for long work (rich); quiet when asked or when output is not a terminal."""

from __future__ import annotations

from concurrent.futures import Executor, as_completed

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


def map_with_progress(pool: Executor, fn, jobs: list[tuple], description: str, quiet: bool = False) -> list:
    """`pool.map(fn, *zip(*jobs))` with a bar that advances as jobs finish; results in job order."""
    futures = [pool.submit(fn, *job) for job in jobs]
    with make_progress(quiet) as progress:
        task = progress.add_task(description, total=len(futures), status="")
        for future in as_completed(futures):
            future.result()  # a failed job stops the run now, with its error
            progress.advance(task)
    return [f.result() for f in futures]
