"""`qdistill demo`: a teacher, then the methods at 4 and 2 bits on one small student, compared in one table.

`--full` is the whole comparison: every method (dq and qd+dq too, the improved qat), 8, 4, 3 and 2
bits, three seeds, summarized as mean (min–max) over the seeds. `--task lm` runs the same on a
language model of the Python documentation, with a sampled continuation per method.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from qdistill.files import write_text
from qdistill.format import is_packed
from qdistill.models import count_parameters, load_checkpoint, model_spec, save_checkpoint
from qdistill.pipeline import LOW_BIT_METHODS, compare_methods, get_teacher
from qdistill.report import accuracy_cell, markdown_table, plot_results, result_columns, summarize
from qdistill.runtime import load_packed
from qdistill.tasks import LanguageModelling, as_task, generate
from qdistill.train import TrainConfig
from qdistill.ui import progress_bars

# One epoch per method in the quick demo keeps a fresh-clone `make demo` under 5 minutes on 2 CPU cores
# and the table's message (ptq collapses at 2 bits, qd ahead of qat, the improved qd near kd).
QUICK = {"methods": ("ptq", "qat", "qd"), "improved": ("qd",), "bits": (4, 2), "seeds": (0,), "epochs": 1}
FULL = {"methods": LOW_BIT_METHODS, "improved": ("qat", "qd"), "bits": (8, 4, 3, 2), "seeds": (0, 1, 2), "epochs": 2}
# Per task: the student, the teacher, the data and the options the demo uses unless told otherwise. The
# language-model demo trains a 2k-token vocabulary (the 8k one costs about 4x more per token on a CPU,
# most of it in the output layer), on the first 600k training tokens, windows of 64, lr 0.01: on 2 CPU
# cores the whole run then fits in 10 minutes; validation and test are the whole splits.
DEMOS = {
    "classification": {"student": "tiny", "teacher": "resnet-small", "teacher_epochs": 3},
    "lm": {"student": "lstm-tiny", "teacher": "lstm-small", "teacher_epochs": 2, "train_subset": 600_000, "vocab_size": 2048, "seq_len": 64},
}
DEMO_CONFIG = {"classification": {}, "lm": {"lr": 0.01}}
SAMPLE_PROMPT = "The list type"  # language models: each method continues it, so 2 bits can be read


def run_demo(
    data,
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
    """The methods on the same student, data (a Dataset or a task) and schedule; writes results.json,
    report.md and plots to run_dir.

    Returns the table's rows: one per method for one seed, else one per method summarized over the seeds."""
    start = time.perf_counter()
    task = as_task(data)
    plan = FULL if full else QUICK
    bits = tuple(bits or plan["bits"])
    base = base or TrainConfig(epochs=plan["epochs"])
    spec = model_spec(student, **task.spec_args())
    with progress_bars(quiet) as progress:
        teacher_model = get_teacher(task, teacher, base.replace(method="fp", epochs=teacher_epochs), progress)
        save_checkpoint(teacher_model, model_spec(teacher, **task.spec_args()), run_dir / "teacher.safetensors")
        teacher_row = {"method": f"teacher ({teacher})", "bits": 32, "size_bytes": (run_dir / "teacher.safetensors").stat().st_size, "params": count_parameters(teacher_model)}
        for split in ("val", "test"):
            if task.has_split(split):
                teacher_row.update({f"{split}_{k}": v for k, v in task.evaluate(teacher_model, split).items()})
        teacher_row["ratio"] = 4 * teacher_row["params"] / teacher_row["size_bytes"]
        rows = []
        for seed in plan["seeds"]:
            seed_dir = run_dir / f"seed-{seed}" if len(plan["seeds"]) > 1 else run_dir
            seed_dir.mkdir(exist_ok=True)
            for row in compare_methods(spec, task, base.replace(seed=seed), seed_dir, teacher_model, bits, plan["methods"], plan["improved"], progress, workers):
                rows.append({**row, "student": student, "seed": seed})
    key = f"test_{task.metric}"
    table = [teacher_row] + (rows if len(plan["seeds"]) == 1 else [{**s, key: s["mean"], "accuracy": accuracy_cell(s)} for s in summarize(rows, key)])
    samples = write_samples(task, run_dir, rows, teacher_model) if isinstance(task, LanguageModelling) and task.corpus.tokenizer_path else []
    seconds = time.perf_counter() - start
    params = next(r["params"] for r in rows if r.get("params"))
    write_report(table, rows, run_dir, f"qdistill demo: student {student} ({params:,} params), teacher {teacher}", base, seconds, plan["seeds"], task.metric, samples)
    return table


def write_samples(task: LanguageModelling, run_dir: Path, rows: list[dict], teacher) -> list[tuple[str, str]]:
    """A continuation of SAMPLE_PROMPT by the teacher and by each saved model (as loaded from its file),
    with the same seed, into samples.md; returns (method, text) pairs."""
    tokenizer = task.corpus.tokenizer()
    prompt = tokenizer.encode(SAMPLE_PROMPT).ids
    models = [("teacher", teacher)]
    for r in rows:
        if r.get("file"):
            path = run_dir / (f"seed-{r['seed']}" if (run_dir / f"seed-{r['seed']}").is_dir() else "") / r["file"]
            models.append((f"{r['method']} ({r['bits']} bits)", load_packed(path)[0] if is_packed(path) else load_checkpoint(path)[0]))
    samples = [(name, tokenizer.decode(generate(model, prompt, 40, seed=0, context=task.seq_len)[len(prompt) :])) for name, model in models]
    lines = ["# Samples", "", f"Each model continues {SAMPLE_PROMPT!r} (40 tokens, temperature 0.8, top-k 50, seed 0).", ""]
    for name, text in samples:
        lines += [f"## {name}", "", "```", SAMPLE_PROMPT + text, "```", ""]
    write_text(run_dir / "samples.md", "\n".join(lines))
    return samples


def write_report(table: list[dict], rows: list[dict], run_dir: Path, title: str, cfg: TrainConfig, seconds: float, seeds, metric: str = "acc", samples=()) -> Path:
    write_text(run_dir / "results.json", json.dumps({"table": table, "rows": rows, "config": cfg.to_dict(), "wall_s": seconds}, indent=1))
    plots = plot_results(table, run_dir, title, metric)
    if len(seeds) == 1:
        body = markdown_table(table, result_columns(metric))
    else:
        label = "test acc. (%)" if metric == "acc" else f"test {metric}"
        columns = [("method", "method", ""), ("bits", "bits", ""), ("accuracy", f"{label}, mean (min–max) over seeds {list(seeds)}", ""), ("size_bytes", "size (bytes)", ","), ("ratio", "vs fp32", ".1f")]
        body = markdown_table([{**r, "accuracy": r.get("accuracy") or f"{r[f'test_{metric}']:.2f}"} for r in table], columns)
    optimizer = "SGD Nesterov" if cfg.optimizer == "sgd" else cfg.optimizer
    lines = [
        f"# {title}",
        "",
        "Metrics are those of the shipped model: the quantized weights, as loaded from the packed file.",
        f"Sizes are the files on disk. Same student, data and schedule for every method ({cfg.epochs} epoch{'s' if cfg.epochs != 1 else ''}, "
        f"{optimizer}, {cfg.schedule}, lr {cfg.lr}, batch {cfg.batch_size}; T = {cfg.temperature}, alpha = {cfg.alpha}).",
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
    if samples:
        lines += ["## Samples", "", f"Each model continues {SAMPLE_PROMPT!r} (40 tokens, temperature 0.8, seed 0):", ""]
        lines += [f"- **{name}**: {SAMPLE_PROMPT}{text!r}" for name, text in samples] + [""]
    path = run_dir / "report.md"
    write_text(path, "\n".join(lines))
    return path
