"""Results of a run as a Markdown table, JSONL metrics and PNG plots, all in the run directory."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


class MetricsLog:
    """Appends one JSON object per line; the file is flushed after each record so a killed run keeps its log."""

    def __init__(self, path: Path):
        self.path = path

    def __call__(self, record: dict) -> None:
        with open(self.path, "a") as f:
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
]


def plot_history(metrics: Path, path: Path, title: str) -> Path | None:
    """Training loss per step and validation accuracy per epoch, one line per phase, from a run's metrics.jsonl
    (None: nothing was trained)."""
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    steps = [r for r in records if "loss" in r and "step" in r]
    epochs = [r for r in records if "val_acc" in r]
    if not steps:
        return None
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(9, 3.5))
    for phase in dict.fromkeys(r["phase"] for r in steps):
        rs = [r for r in steps if r["phase"] == phase]
        loss_ax.plot([r["epoch"] for r in rs], [r["loss"] for r in rs], linewidth=0.8, label=phase)
        rs = [r for r in epochs if r["phase"] == phase]
        if rs:
            acc_ax.plot([r["epoch"] for r in rs], [r["val_acc"] for r in rs], marker="o", label=phase)
    for ax, label in ((loss_ax, "training loss (per step)"), (acc_ax, "validation accuracy (%)")):
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    loss_ax.set_yscale("log")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_results(rows: list[dict], out_dir: Path, title: str) -> list[Path]:
    """Accuracy against bits and against size on disk, one line per method; fp32 models as dashed lines."""
    methods = list(dict.fromkeys(r["method"] for r in rows if r["bits"] != 32))
    reference = [r for r in rows if r["bits"] == 32]
    styles = ["--", ":", "-."]
    paths = []
    for x_key, x_label, name in (("bits", "bits per weight", "accuracy_vs_bits.png"), ("size_bytes", "size on disk (bytes)", "accuracy_vs_size.png")):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for m in methods:
            pts = sorted((r[x_key], r["test_acc"]) for r in rows if r["method"] == m)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m)
        for i, r in enumerate(reference):
            ax.axhline(r["test_acc"], linestyle=styles[i % 3], linewidth=1, color="gray", label=f"{r['method']}, fp32 ({r['test_acc']:.2f}%)")
        if x_key == "size_bytes":
            ax.set_xscale("log")
        else:
            ax.set_xticks(sorted({r["bits"] for r in rows if r["bits"] != 32}))
        ax.set_xlabel(x_label)
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
        fig.tight_layout()
        path = out_dir / name
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths
