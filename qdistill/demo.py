"""`qdistill demo`: teacher, then every method at 4 and 2 bits on one small student, compared in one table."""

from __future__ import annotations

import json
import time
from pathlib import Path

from qdistill.data import Dataset
from qdistill.models import count_parameters, model_spec, save_checkpoint
from qdistill.pipeline import compare_methods, get_teacher
from qdistill.report import RESULT_COLUMNS, markdown_table, plot_results
from qdistill.train import TrainConfig, evaluate


def run_demo(
    data: Dataset,
    run_dir: Path,
    student: str = "tiny",
    teacher: str = "resnet-small",
    teacher_epochs: int = 3,
    bits: tuple[int, ...] = (4, 2),
    base: TrainConfig | None = None,
    quiet: bool = False,
) -> list[dict]:
    """Every method on the same student, data and schedule; writes results.json, report.md and plots to run_dir."""
    start = time.perf_counter()
    base = base or TrainConfig(epochs=2)
    spec = model_spec(student, data.train_x.shape[1], data.num_classes)
    teacher_model = get_teacher(data, teacher, base.replace(method="fp", epochs=teacher_epochs), quiet=quiet)
    save_checkpoint(teacher_model, model_spec(teacher, data.train_x.shape[1], data.num_classes), run_dir / "teacher.safetensors")
    rows = [
        {
            "method": f"teacher ({teacher})",
            "bits": 32,
            "test_acc": evaluate(teacher_model, data.test_x, data.test_y),
            "size_bytes": (run_dir / "teacher.safetensors").stat().st_size,
            "params": count_parameters(teacher_model),
        }
    ]
    rows[0]["ratio"] = 4 * rows[0]["params"] / rows[0]["size_bytes"]
    rows += compare_methods(spec, data, base, run_dir, teacher_model, bits, improved=("qd",), quiet=quiet)
    seconds = time.perf_counter() - start
    write_report(rows, run_dir, f"qdistill demo: student {student} ({rows[1]['params']:,} params), teacher {teacher}", base, seconds)
    return rows


def write_report(rows: list[dict], run_dir: Path, title: str, cfg: TrainConfig, seconds: float) -> Path:
    (run_dir / "results.json").write_text(json.dumps({"rows": rows, "config": cfg.to_dict(), "wall_s": seconds}, indent=1))
    plots = plot_results(rows, run_dir, title)
    lines = [
        f"# {title}",
        "",
        "Accuracy is that of the shipped model: the quantized weights, as loaded from the packed file.",
        f"Sizes are the files on disk. Same student, data and schedule for every method ({cfg.epochs} epochs, "
        f"SGD Nesterov, {cfg.schedule}, lr {cfg.lr}, batch {cfg.batch_size}; T = {cfg.temperature}, alpha = {cfg.alpha}).",
        "",
        markdown_table(rows, RESULT_COLUMNS),
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
