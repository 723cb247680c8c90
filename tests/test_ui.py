import ast
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import qdistill.ui
from qdistill.pipeline import map_jobs
from qdistill.ui import make_progress, progress_bars

PACKAGE = Path(__file__).parents[1] / "qdistill"  # this checkout's, whichever one `import qdistill` finds
TERMINAL = {"cli.py", "demo.py", "ui.py"}  # the modules that own the terminal


def slow_square(x, delay):
    time.sleep(delay)
    if x < 0:
        raise ValueError(f"negative {x}")
    return x * x


def test_results_come_in_job_order_whatever_finishes_first():
    seen = []
    with ThreadPoolExecutor(3) as pool:
        assert map_jobs(pool, slow_square, [(1, 0.2), (2, 0.0), (3, 0.1)], "squares", lambda *a: seen.append(a)) == [1, 4, 9]
    assert seen == [("squares", 0, 3), ("squares", 1, 3), ("squares", 2, 3), ("squares", 3, 3)]


def test_a_failed_job_raises_its_error():
    with ThreadPoolExecutor(2) as pool, pytest.raises(ValueError, match="negative -1"):
        map_jobs(pool, slow_square, [(1, 0.0), (-1, 0.0)], "squares")


def test_progress_bars_draw_a_bar_per_name_and_run(monkeypatch):
    made = []
    monkeypatch.setattr(qdistill.ui, "make_progress", lambda quiet: made.append(make_progress(True)) or made[0])
    with progress_bars() as progress:
        progress("qd 2b", 0, 10)
        progress("qd 2b", 4, 10, "loss 1.0")
        progress("teacher logits", 1, 2)
        progress("qd 2b", 10, 10)
        progress("qd 2b", 0, 10)  # the next run's phase of that name
        progress("teacher logits", 2, 2)
        progress("dq 2b points", 1, 1)  # a bar that starts full
        progress("dq 2b points", 0, 1)  # is a run of its own, and so is the next
    tasks = [(t.description, t.completed, t.total, t.fields["status"]) for t in made[0].tasks]
    assert tasks == [("qd 2b", 10, 10, ""), ("teacher logits", 2, 2, ""), ("qd 2b", 0, 10, ""), ("dq 2b points", 1, 1, ""), ("dq 2b points", 0, 1, "")]


def library_modules():
    return [p for p in PACKAGE.rglob("*.py") if p.relative_to(PACKAGE).as_posix() not in TERMINAL]


def test_the_library_draws_nothing_on_the_terminal():
    """rich, the progress bars and print belong to the CLI and the demo; the library reports through
    callbacks and logging, so that a user's own program decides what its terminal shows."""
    offenders = []
    for path in library_modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                offenders += [f"{path.name} imports {n}" for n in names if n.split(".")[0] == "rich" or n == "qdistill.ui"]
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
                offenders.append(f"{path.name}:{node.lineno} prints")
    assert library_modules() and not offenders, offenders
