"""Measure what an option buys: variants of a method against the same baseline, seeds and full-precision target.

A variant is ``"label: key=value, key=value"``: TrainConfig overrides (the method defaults to qd), plus
``init=LABEL`` to start from the weights, same seed, of kd or of a full-precision (fp or kd) variant.
Per seed, kd is trained first (the goal: a low-bit student as good as its full-precision distilled
twin), then the variants that others start from, then the rest. The first variant is the baseline
the gains are measured against. Writes bench/results/ablation-<tag>.{json,md}.

    python bench/ablation.py --tag 2bit --bits 2 --variant "qd" --variant "qd, mse scale: scale=mse" \\
        --variant "qd from kd: init=kd" --variant "fp: method=fp" --variant "qat from fp: method=qat, init=fp"
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
import yaml

from qdistill.data import load_dataset
from qdistill.models import load_checkpoint, model_spec, save_checkpoint
from qdistill.distill import CachedTeacher
from qdistill.pipeline import cache_dir, get_teacher, run_method
from qdistill.report import markdown_table
from qdistill.train import TrainConfig, evaluate
from qdistill.ui import map_with_progress

RESULTS = Path(__file__).parent / "results"


def parse_variant(text: str) -> tuple[str, dict]:
    """``"label: a=1, b=x"`` -> ("label", {"a": 1, "b": "x"}); values are read as YAML scalars."""
    label, _, rest = text.partition(":")
    changes = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq:
            raise SystemExit(f"variant {text!r}: {item!r} is not key=value")
        changes[key.strip().replace("-", "_")] = yaml.safe_load(value.strip())
    return label.strip(), changes


def run_one(label: str, changes: dict, seed: int, base: dict, paths: dict, data_args: dict, threads: int) -> dict:
    """Train one variant for one seed in its own process; a full-precision variant leaves its weights for `init`."""
    torch.set_num_threads(threads)
    data = load_dataset(data_args["dataset"], data_args["data_dir"]).subset(data_args["train_subset"], data_args["test_subset"])
    teacher = load_checkpoint(paths["teacher"])[0]
    changes = dict(changes)
    init_label = changes.pop("init", None)
    init = load_checkpoint(paths[(init_label, seed)])[0] if init_label else None
    cfg = TrainConfig.from_dict({**base, "method": "qd", **changes, "seed": seed})
    spec = model_spec(data_args["student"], data.train_x.shape[1], data.num_classes)
    with tempfile.TemporaryDirectory() as tmp:
        row, model = run_method(label, spec, data, cfg, Path(tmp), teacher=teacher, init=init, quiet=True)
    if (label, seed) in paths:
        save_checkpoint(model, spec, paths[(label, seed)])
    return {**row, "variant": label, "seed": seed}


def summarize(rows: list[dict], labels: list[str]) -> list[dict]:
    by_label = {label: [r for r in rows if r["variant"] == label] for label in labels}
    kd_mean = statistics.mean(r["test_acc"] for r in by_label["kd"])
    base_mean = statistics.mean(r["test_acc"] for r in by_label[labels[1]])
    out = []
    for label in labels:
        accs = [r["test_acc"] for r in by_label[label]]
        mean = statistics.mean(accs)
        out.append(
            {
                "variant": label,
                "bits": by_label[label][0]["bits"],
                "mean": mean,
                "min": min(accs),
                "max": max(accs),
                "vs_kd": mean - kd_mean,
                "vs_baseline": None if label == "kd" else mean - base_mean,
                "size_bytes": by_label[label][0]["size_bytes"],
                "train_s": statistics.mean(r["train_s"] for r in by_label[label]),
            }
        )
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", action="append", required=True, help="'label: key=value, ...' (repeatable; the first is the baseline)")
    p.add_argument("--bits", type=int, default=2)
    p.add_argument("--student", default="tiny")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--teacher", default="resnet-small")
    p.add_argument("--teacher-epochs", type=int, default=3)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--data-dir")
    p.add_argument("--train-subset", type=int)
    p.add_argument("--test-subset", type=int)
    p.add_argument("--tag", required=True, help="results file: ablation-<tag>")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    variants = [parse_variant(v) for v in args.variant]
    labels = ["kd"] + [label for label, _ in variants]
    if len(set(labels)) != len(labels):
        raise SystemExit("variant labels must be distinct and not 'kd'")
    base = TrainConfig(epochs=args.epochs, bits=args.bits)
    methods = {"kd": "kd"}
    for label, changes in variants:  # fail before any training on a bad key, value or init
        cfg = TrainConfig.from_dict({**base.to_dict(), "method": "qd", **{k: v for k, v in changes.items() if k != "init"}})
        if changes.get("init") is not None and methods.get(changes["init"]) not in ("fp", "kd"):
            raise SystemExit(f"variant {label!r}: init={changes['init']} must name kd or an earlier fp/kd variant")
        methods[label] = cfg.method
    sources = {"kd"} | {changes["init"] for _, changes in variants if changes.get("init")}
    start = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    card = torch.cuda.get_device_name(0) if device == "cuda" else f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"
    data = load_dataset(args.dataset, args.data_dir).subset(args.train_subset, args.test_subset)
    teacher = get_teacher(data, args.teacher, base.replace(method="fp", epochs=args.teacher_epochs), quiet=True)
    teacher_acc = evaluate(teacher, data.test_x, data.test_y)
    CachedTeacher.build(teacher.to(device), data.train_x, cache_dir() / "logits", device=device)  # once, not once per worker
    data_args = {"dataset": args.dataset, "data_dir": args.data_dir, "train_subset": args.train_subset, "test_subset": args.test_subset, "student": args.student}
    threads = max(1, torch.get_num_threads() // args.workers)
    with tempfile.TemporaryDirectory() as tmp, ProcessPoolExecutor(args.workers, mp_context=torch.multiprocessing.get_context("spawn")) as pool:
        paths = {"teacher": str(Path(tmp) / "teacher.safetensors")}
        paths |= {(label, s): str(Path(tmp) / f"init-{i}-{s}.safetensors") for i, label in enumerate(sorted(sources)) for s in args.seeds}
        save_checkpoint(teacher, model_spec(args.teacher, data.train_x.shape[1], data.num_classes), paths["teacher"])

        def run_all(jobs, description):
            return map_with_progress(pool, run_one, [job + (base.to_dict(), paths, data_args, threads) for job in jobs], description)

        first = [("kd", {"method": "kd"})] + [v for v in variants if v[0] in sources]
        rows = run_all([(label, changes, s) for label, changes in first for s in args.seeds], "starting points (variant, seed)")
        rows += run_all([(label, changes, s) for label, changes in variants if label not in sources for s in args.seeds], "variants (variant, seed)")
    seconds = time.perf_counter() - start
    summary = summarize(rows, labels)
    setup = (
        f"{card}; student {args.student}; teacher {args.teacher} ({args.teacher_epochs} epochs) {teacher_acc:.2f}%; "
        f"{args.bits} bits; {args.epochs} epochs unless a variant says otherwise; seeds {args.seeds}; "
        f"train examples {len(data.train_x)}, test {len(data.test_x)}; wall time {seconds:.0f} s"
    )
    columns = [
        ("variant", "variant", ""), ("bits", "bits", ""), ("mean", "mean acc. (%)", ".2f"), ("min", "min", ".2f"), ("max", "max", ".2f"),
        ("vs_kd", "vs kd", "+.2f"), ("vs_baseline", "vs baseline", "+.2f"), ("size_bytes", "size (bytes)", ","), ("train_s", "train s", ".0f"),
    ]
    spelled = "\n".join(f"- `{v}`" for v in args.variant)
    md = f"# Ablation: {args.tag}\n\n{setup}.\n\nVariants (label: TrainConfig overrides; the first is the baseline):\n{spelled}\n\n{markdown_table(summary, columns)}\n"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"ablation-{args.tag}.json").write_text(json.dumps({"setup": setup, "card": card, "variants": args.variant, "summary": summary, "rows": rows}, indent=1))
    (args.out / f"ablation-{args.tag}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
