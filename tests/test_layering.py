"""The package's import direction, read from the source (every import counts, those inside functions too):

  format/   the packed file; nothing from runtime/ or export/, which build on it
  runtime/  loading and running a packed file; nothing from export/
  export/   the exporters, on top of both
  cli.py    imported by __main__.py alone
  models/   nothing from data/ or tasks/ (a user's factory is imported by user_code.py)
  quant/    nothing from train/, tasks/, distill/, format/, runtime/ or export/
  tasks/    classification.py, language.py and embedding.py import no other task module
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[1] / "qdistill"  # this checkout's, whichever one `import qdistill` finds
ROOMS = {  # a folder of the package: the modules none of its files may import
    "format": ("qdistill.runtime", "qdistill.export"),
    "runtime": ("qdistill.export",),
    "models": ("qdistill.data", "qdistill.tasks"),
    "quant": ("qdistill.train", "qdistill.tasks", "qdistill.distill", "qdistill.format", "qdistill.runtime", "qdistill.export"),
}
TASKS = ("classification", "language", "embedding")  # tasks/__init__.py and build.py gather them


def imported(path: Path, root: Path = PACKAGE.parent) -> set[str]:
    """Every module `path` (a file below the folder `root`) imports, anywhere in it: `import a.b` gives a.b,
    `from a import b` gives a and a.b (b may be a module), relative imports resolved against the file's package;
    `importlib.import_module("a.b")` with a literal name gives a.b."""
    parts = path.relative_to(root).with_suffix("").parts
    package = ".".join(parts[:-1])  # an __init__.py's package is its own
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]) if node.level else ""
            module = ".".join(p for p in (base, node.module or "") if p)
            names.add(module)
            names.update(f"{module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module":
            if node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                names.add(node.args[0].value)
    return names


def offenders(paths, forbidden, root: Path = PACKAGE.parent) -> list[str]:
    """`file: module` for each import of a module in `forbidden` or below one."""
    return sorted(
        f"{path.relative_to(root)}: {name}"
        for path in paths
        for name in imported(path, root)
        if any(name == f or name.startswith(f"{f}.") for f in forbidden)
    )


def test_the_scan_sees_every_kind_of_import(tmp_path):
    source = tmp_path / "qdistill" / "room" / "mod.py"
    source.parent.mkdir(parents=True)
    source.write_text(
        "import qdistill.a.b\nfrom qdistill import c\nfrom . import d\nfrom ..e import f\n"
        "def lazy():\n    import importlib\n    from qdistill.g import h\n    importlib.import_module('qdistill.i')\n"
    )
    names = imported(source, tmp_path)
    assert {"qdistill.a.b", "qdistill.c", "qdistill.room.d", "qdistill.e.f", "qdistill.g.h", "qdistill.i"} <= names
    assert offenders([source], ("qdistill.g",), tmp_path) == [f"{Path('qdistill', 'room', 'mod.py')}: qdistill.g", f"{Path('qdistill', 'room', 'mod.py')}: qdistill.g.h"]


@pytest.mark.parametrize("room", ROOMS)
def test_a_room_imports_nothing_above_it(room):
    assert offenders((PACKAGE / room).rglob("*.py"), ROOMS[room]) == []


def test_only_the_entry_points_import_the_cli():
    paths = [p for p in PACKAGE.rglob("*.py") if p.relative_to(PACKAGE).as_posix() not in ("cli.py", "__main__.py")]
    assert offenders(paths, ("qdistill.cli",)) == []


@pytest.mark.parametrize("task", TASKS)
def test_a_task_imports_no_other_task(task):
    """Nothing from qdistill.tasks: not a sibling, nor the package (whose __init__ imports every task)."""
    assert offenders([PACKAGE / "tasks" / f"{task}.py"], ("qdistill.tasks",)) == []
