"""Results of a run as a Markdown table, JSONL metrics and PNG plots, all in the run directory."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from qdistill.files import open_unlinked, replaced_whole  # noqa: E402


class MetricsLog:
    """Appends one JSON object per line; the file is flushed after each record so a killed run keeps its log."""

    def __init__(self, path: Path):
        self.path = path

    def __call__(self, record: dict) -> None:
        with open_unlinked(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def markdown_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """columns: (key, header, format spec)."""
    lines = ["| " + " | ".join(h for _, h, _ in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = []
        for key, _, fmt in columns:
            value = row.get(key)
            cells.append("" if value is None else format(value, fmt))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


RESULT_COLUMNS = [
    ("method", "method", ""),
    ("bits", "bits", ""),
    ("bucket", "bucket", ""),
    ("val_acc", "val. acc. (%)", ".2f"),
    ("test_acc", "test acc. (%)", ".2f"),
    ("size_bytes", "size (bytes)", ","),
    ("ratio", "vs fp32", ".1f"),
    ("train_s", "train time (s)", ".1f"),
    ("note", "note", ""),
]


# Language models: perplexity (lower is better) and bits per byte of the text, which no tokenizer changes.
LM_COLUMNS = [
    ("method", "method", ""),
    ("bits", "bits", ""),
    ("bucket", "bucket", ""),
    ("val_ppl", "val. ppl", ".2f"),
    ("test_ppl", "test ppl", ".2f"),
    ("test_bpb", "test bits/byte", ".3f"),
    ("size_bytes", "size (bytes)", ","),
    ("ratio", "vs fp32", ".1f"),
    ("train_s", "train time (s)", ".1f"),
    ("note", "note", ""),
]

# Sentence embeddings: agreement with the teacher (cosine, neighbours) and title-to-section retrieval.
EMBEDDING_COLUMNS = [
    ("method", "method", ""),
    ("bits", "bits", ""),
    ("bucket", "bucket", ""),
    ("val_cos", "val. cosine", ".4f"),
    ("test_cos", "test cosine", ".4f"),
    ("test_nbr10", "neighbours@10", ".3f"),
    ("test_r1", "retrieval@1", ".3f"),
    ("test_r10", "retrieval@10", ".3f"),
    ("size_bytes", "size (bytes)", ","),
    ("ratio", "vs fp32", ".1f"),
    ("train_s", "train time (s)", ".1f"),
    ("note", "note", ""),
]

METRIC_LABELS = {"acc": "accuracy (%)", "ppl": "perplexity", "cos": "cosine to the teacher"}


def result_columns(metric: str) -> list[tuple[str, str, str]]:
    return {"ppl": LM_COLUMNS, "cos": EMBEDDING_COLUMNS}.get(metric, RESULT_COLUMNS)


# The order of the methods in every table: the references, then the low-bit methods.
ORDER = ["fp", "kd", "ptq (global)", "ptq", "qat", "qd", "qat (from fp, mse)", "qd (from kd, mse, T 1)", "dq", "qd+dq"]


def summarize(rows: list[dict], key: str = "test_acc") -> list[dict]:
    """Mean, min and max of `key` over the seeds that trained, per (student, method, bits), and how many
    diverged or were not run; sizes relative to the student's fp32 size."""
    students = list(dict.fromkeys(r["student"] for r in rows))
    params = {r["student"]: r["params"] for r in rows if r.get(key) is not None}
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["student"], r["method"], r["bits"]), []).append(r)
    out = []
    for (student, method, bits), rs in groups.items():
        trained = [r for r in rs if r.get(key) is not None]
        accs = [r[key] for r in trained]
        n, size = params.get(student), trained[0]["size_bytes"] if trained else None
        out.append(
            {
                "student": student,
                "params": n,
                "method": method,
                "bits": bits,
                "seeds": len(rs),
                "diverged": sum("diverged" in r for r in rs),
                "not_run": sum("not_run" in r for r in rs),
                "why_not_run": ", ".join(sorted({r["not_run"] for r in rs if "not_run" in r})) or None,
                "mean": statistics.mean(accs) if accs else None,
                "min": min(accs, default=None),
                "max": max(accs, default=None),
                "size_bytes": size,
                "ratio": 4 * n / size if n and size else None,
            }
        )
    rank = {m: i for i, m in enumerate(ORDER)}
    return sorted(out, key=lambda r: (students.index(r["student"]), -r["bits"] if r["bits"] != 32 else -99, rank.get(r["method"], 99)))


def accuracy_cell(s: dict) -> str:
    """"92.20 (91.97–92.56), 1/3 diverged": mean (min–max) over the seeds that trained, then those that
    did not; never an accuracy where no seed trained."""
    n = s["seeds"]
    notes = [f"{s['diverged']}/{n} diverged"] if s["diverged"] else []
    if s["not_run"]:
        notes.append(f"{s['not_run']}/{n} not run ({s['why_not_run']})")
    if s["mean"] is None:
        return f"diverged ({n}/{n})" if s["diverged"] == n else ", ".join(notes)
    return ", ".join([f"{s['mean']:.2f} ({s['min']:.2f}–{s['max']:.2f})", *notes])


def plot_history(metrics: Path, path: Path, title: str, metric: str = "acc") -> Path | None:
    """Training loss per step and the validation metric per epoch, one line per phase, from a run's metrics.jsonl
    (None: nothing was trained)."""
    key = f"val_{metric}"
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    steps = [r for r in records if "loss" in r and "step" in r]
    epochs = [r for r in records if key in r]
    if not steps:
        return None
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(9, 3.5))
    for phase in dict.fromkeys(r["phase"] for r in steps):
        rs = [r for r in steps if r["phase"] == phase]
        loss_ax.plot([r["epoch"] for r in rs], [r["loss"] for r in rs], linewidth=0.8, label=phase)
        rs = [r for r in epochs if r["phase"] == phase]
        if rs:
            acc_ax.plot([r["epoch"] for r in rs], [r[key] for r in rs], marker="o", label=phase)
    for ax, label in ((loss_ax, "training loss (per step)"), (acc_ax, f"validation {METRIC_LABELS.get(metric, metric)}")):
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    loss_ax.set_yscale("log")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    with replaced_whole(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
    return path


def plot_results(rows: list[dict], out_dir: Path, title: str, metric: str = "acc") -> list[Path]:
    """The test metric against bits and against size on disk, one line per method; fp32 models as dashed lines."""
    key, label = f"test_{metric}", METRIC_LABELS.get(metric, metric)
    rows = [r for r in rows if r.get(key) is not None]  # a diverged run has no point
    methods = list(dict.fromkeys(r["method"] for r in rows if r["bits"] != 32))
    reference = [r for r in rows if r["bits"] == 32]
    styles = ["--", ":", "-."]
    paths = []
    stem = "accuracy" if metric == "acc" else metric
    for x_key, x_label, name in (("bits", "bits per weight", f"{stem}_vs_bits.png"), ("size_bytes", "size on disk (bytes)", f"{stem}_vs_size.png")):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for m in methods:
            pts = sorted((r[x_key], r[key]) for r in rows if r["method"] == m)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m)
        for i, r in enumerate(reference):
            ax.axhline(r[key], linestyle=styles[i % 3], linewidth=1, color="gray", label=f"{r['method']}, fp32 ({r[key]:.2f}{'%' if metric == 'acc' else ''})")
        if x_key == "size_bytes":
            ax.set_xscale("log")
        else:
            ax.set_xticks(sorted({r["bits"] for r in rows if r["bits"] != 32}))
        ax.set_xlabel(x_label)
        ax.set_ylabel(f"test {label}")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right" if metric == "acc" else "upper right")
        fig.tight_layout()
        path = out_dir / name
        with replaced_whole(path) as tmp:
            fig.savefig(tmp, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths
