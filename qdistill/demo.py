"""`qdistill demo`: teacher, then every method at 4 and 2 bits on one small student, compared in one table."""

from __future__ import annotations

import json
import time
from pathlib import Path

from qdistill.data import Dataset
from qdistill.models import count_parameters, model_spec, save_checkpoint
from qdistill.pipeline import get_teacher, run_method
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

    def run(label, cfg, init=None):
        row, model = run_method(label, spec, data, cfg, run_dir, teacher=teacher_model, init=init, quiet=quiet)
        rows.append(row)
        return model

    fp_model = run("fp", base.replace(method="fp"))
    kd_model = run("kd", base.replace(method="kd"))
    for b in bits:
        run("ptq", base.replace(method="ptq", bits=b), init=fp_model)
        run("ptq (global)", base.replace(method="ptq", bits=b, bucket=None), init=fp_model)
        run("qat", base.replace(method="qat", bits=b))
        qd_model = run("qd", base.replace(method="qd", bits=b))
        qd_seconds = rows[-1]["train_s"]
        run("dq", base.replace(method="dq", bits=b), init=kd_model)
        # qd+dq = the qd run above, then its points fine-tuned starting from its own uniform levels
        run("qd+dq", base.replace(method="dq", bits=b, points_init="uniform"), init=qd_model)
        rows[-1]["train_s"] += qd_seconds
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
        f"Wall time: {seconds:.0f} s.",
        "",
        *[f"![{p.stem}]({p.name})" for p in plots],
        "",
    ]
    path = run_dir / "report.md"
    path.write_text("\n".join(lines))
    return path
