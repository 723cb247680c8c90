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
    ("test_acc", "test acc. (%)", ".2f"),
    ("size_bytes", "size (bytes)", ","),
    ("ratio", "vs fp32", ".1f"),
    ("train_s", "train time (s)", ".1f"),
]


def plot_results(rows: list[dict], out_dir: Path, title: str) -> list[Path]:
    """Accuracy against bits and against size on disk, one line per method."""
    methods = sorted({r["method"] for r in rows if r["bits"] != 32})
    reference = [r for r in rows if r["bits"] == 32]
    paths = []
    for x_key, x_label, name in (("bits", "bits per weight", "accuracy_vs_bits.png"), ("size_bytes", "size on disk (bytes)", "accuracy_vs_size.png")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for m in methods:
            pts = sorted((r[x_key], r["test_acc"]) for r in rows if r["method"] == m)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m)
        for r in reference:
            ax.axhline(r["test_acc"], linestyle="--", linewidth=1, color="gray")
            ax.annotate(f"{r['method']} fp32", (ax.get_xlim()[0], r["test_acc"]), fontsize=7, va="bottom")
        if x_key == "size_bytes":
            ax.set_xscale("log")
        ax.set_xlabel(x_label)
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / name
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths
