"""`qdistill demo`: a teacher, then the methods at 4 and 2 bits on one small student, compared in one table.

`--full` is the whole comparison: every method (dq and qd+dq too, the improved qat), 8, 4, 3 and 2
bits, three seeds, summarized as mean (min–max) over the seeds.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from qdistill.data import Dataset
from qdistill.models import count_parameters, model_spec, save_checkpoint
from qdistill.pipeline import LOW_BIT_METHODS, compare_methods, get_teacher
from qdistill.report import RESULT_COLUMNS, accuracy_cell, markdown_table, plot_results, summarize
from qdistill.train import TrainConfig, evaluate

# One epoch per method in the quick demo keeps a fresh-clone `make demo` under 5 minutes on 2 CPU cores
# and the table's message (ptq collapses at 2 bits, qd ahead of qat, the improved qd near kd).
QUICK = {"methods": ("ptq", "qat", "qd"), "improved": ("qd",), "bits": (4, 2), "seeds": (0,), "epochs": 1}
FULL = {"methods": LOW_BIT_METHODS, "improved": ("qat", "qd"), "bits": (8, 4, 3, 2), "seeds": (0, 1, 2), "epochs": 2}


def run_demo(
    data: Dataset,
    run_dir: Path,
    student: str = "tiny",
    teacher: str = "resnet-small",
    teacher_epochs: int = 3,
    bits: tuple[int, ...] | None = None,
    base: TrainConfig | None = None,
    quiet: bool = False,
    full: bool = False,
    workers: int = 2,
) -> list[dict]:
    """The methods on the same student, data and schedule; writes results.json, report.md and plots to run_dir.

    Returns the table's rows: one per method for one seed, else one per method summarized over the seeds."""
    start = time.perf_counter()
    plan = FULL if full else QUICK
    bits = tuple(bits or plan["bits"])
    base = base or TrainConfig(epochs=plan["epochs"])
    spec = model_spec(student, data.train_x.shape[1], data.num_classes)
    teacher_model = get_teacher(data, teacher, base.replace(method="fp", epochs=teacher_epochs), quiet=quiet)
    save_checkpoint(teacher_model, model_spec(teacher, data.train_x.shape[1], data.num_classes), run_dir / "teacher.safetensors")
    teacher_row = {
        "method": f"teacher ({teacher})",
        "bits": 32,
        "val_acc": evaluate(teacher_model, data.val_x, data.val_y) if data.val_x is not None else None,
        "test_acc": evaluate(teacher_model, data.test_x, data.test_y),
        "size_bytes": (run_dir / "teacher.safetensors").stat().st_size,
        "params": count_parameters(teacher_model),
    }
    teacher_row["ratio"] = 4 * teacher_row["params"] / teacher_row["size_bytes"]
    rows = []
    for seed in plan["seeds"]:
        seed_dir = run_dir / f"seed-{seed}" if len(plan["seeds"]) > 1 else run_dir
        seed_dir.mkdir(exist_ok=True)
        for row in compare_methods(spec, data, base.replace(seed=seed), seed_dir, teacher_model, bits, plan["methods"], plan["improved"], quiet, workers):
            rows.append({**row, "student": student, "seed": seed})
    table = [teacher_row] + (rows if len(plan["seeds"]) == 1 else [{**s, "test_acc": s["mean"], "accuracy": accuracy_cell(s)} for s in summarize(rows)])
    seconds = time.perf_counter() - start
    params = next(r["params"] for r in rows if r.get("params"))
    write_report(table, rows, run_dir, f"qdistill demo: student {student} ({params:,} params), teacher {teacher}", base, seconds, plan["seeds"])
    return table


def write_report(table: list[dict], rows: list[dict], run_dir: Path, title: str, cfg: TrainConfig, seconds: float, seeds) -> Path:
    (run_dir / "results.json").write_text(json.dumps({"table": table, "rows": rows, "config": cfg.to_dict(), "wall_s": seconds}, indent=1))
    plots = plot_results(table, run_dir, title)
    if len(seeds) == 1:
        body = markdown_table(table, RESULT_COLUMNS)
    else:
        columns = [("method", "method", ""), ("bits", "bits", ""), ("accuracy", f"test acc. (%), mean (min–max) over seeds {list(seeds)}", ""), ("size_bytes", "size (bytes)", ","), ("ratio", "vs fp32", ".1f")]
        body = markdown_table([{**r, "accuracy": r.get("accuracy") or f"{r['test_acc']:.2f}"} for r in table], columns)
    lines = [
        f"# {title}",
        "",
        "Accuracy is that of the shipped model: the quantized weights, as loaded from the packed file.",
        f"Sizes are the files on disk. Same student, data and schedule for every method ({cfg.epochs} epoch{'s' if cfg.epochs != 1 else ''}, "
        f"SGD Nesterov, {cfg.schedule}, lr {cfg.lr}, batch {cfg.batch_size}; T = {cfg.temperature}, alpha = {cfg.alpha}).",
        "",
        body,
        "",
        "qd (from kd, mse, T 1) is quantized distillation with the options measured in bench/ablation.py: started",
        "from the kd student's weights, each bucket's range clipped to the least squared error (scale mse), T = 1.",
        "",
        f"Wall time: {seconds:.0f} s.",
        "",
        *[f"![{p.stem}]({p.name})" for p in plots],
        "",
    ]
    path = run_dir / "report.md"
    path.write_text("\n".join(lines))
    return path
