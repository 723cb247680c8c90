"""Measure what an option buys: variants of a method against the same baseline, seeds and full-precision target.

A variant is ``"label: key=value, key=value"``: TrainConfig overrides (the method defaults to qd), plus
``init=LABEL`` to start from the weights, same seed, of kd or of a full-precision (fp or kd) variant.
Per seed, kd is trained first (the goal: a low-bit student as good as its full-precision distilled
twin), then the variants that others start from, then the rest. The first variant is the baseline
the gains are measured against. Writes bench/results/ablation-<tag>.{json,md}.

A run that diverges (qdistill.errors.Diverged) gets a row marked diverged instead of stopping the
ablation, and a variant that starts from it (init=) is marked not run for that seed; the table averages
the seeds that trained and says how many diverged.

To resume after a kill, run the same command again. Each finished (variant, seed) row, and the weights
others start from, are kept in a work directory (--work-dir, default bench/results/work-ablation-<tag>/)
as soon as the run ends; a rerun skips what it finds there. A rerun with other arguments into the same
work directory is refused: delete the directory (or give another --work-dir) to start over.

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
from pathlib import Path

import torch
import yaml

from qdistill.data import load_dataset
from qdistill.distill import CachedTeacher
from qdistill.errors import Diverged
from qdistill.models import load_checkpoint, model_spec, save_checkpoint
from qdistill.pipeline import cache_dir, map_jobs, run_method, worker_pool
from qdistill.report import accuracy_cell, markdown_table
from qdistill.train import TrainConfig, evaluate
from qdistill.ui import progress_bars

from accuracy import open_work_dir, work_teacher, write_json  # bench/accuracy.py, next to this script

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
    """Train one variant for one seed in its own process; a full-precision variant leaves its weights for
    `init`. A run that diverges gives a row marked so; one whose `init` has no weights in `paths` (it
    diverged) is marked not run."""
    torch.set_num_threads(threads)
    changes = dict(changes)
    init_label = changes.pop("init", None)
    cfg = TrainConfig.from_dict({**base, "method": "qd", **changes, "seed": seed})
    mark = {"variant": label, "seed": seed, "bits": cfg.bits if cfg.spec.quantizer is not None else 32, "test_acc": None}
    if init_label and (init_label, seed) not in paths:
        return {**mark, "not_run": f"{init_label} diverged"}
    data = load_dataset(data_args["dataset"], data_args["data_dir"], data_args["val_size"]).subset(data_args["train_subset"], data_args["test_subset"])
    teacher = load_checkpoint(paths["teacher"])[0]
    init = load_checkpoint(paths[(init_label, seed)])[0] if init_label else None
    spec = model_spec(data_args["student"], data.train_x.shape[1], data.num_classes)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            row, model = run_method(label, spec, data, cfg, Path(tmp), teacher=teacher, init=init)
        except Diverged as e:
            return {**mark, "diverged": e.record()}
    if (label, seed) in paths:
        save_checkpoint(model, spec, paths[(label, seed)])
    return {**row, "variant": label, "seed": seed}


def finish(path: str, *job) -> None:
    """Run one (variant, seed) in a worker and keep its row at once, so that a killed run loses only the runs under way."""
    write_json(Path(path), run_one(*job))


def summarize(rows: list[dict], labels: list[str], metric: str = "val_acc") -> list[dict]:
    """Per variant: mean, min and max of `metric` over the seeds that trained, how many did not, and the
    gains in mean accuracy over kd and over the baseline (the first variant, labels[1])."""
    by_label = {label: [r for r in rows if r["variant"] == label] for label in labels}
    trained = {label: [r for r in rs if r.get(metric) is not None] for label, rs in by_label.items()}
    means = {label: statistics.mean(r[metric] for r in rs) if rs else None for label, rs in trained.items()}
    kd_mean, base_mean = means["kd"], means[labels[1]]
    out = []
    for label in labels:
        accs, mean = [r[metric] for r in trained[label]], means[label]
        out.append(
            {
                "variant": label,
                "bits": by_label[label][0]["bits"],
                "seeds": len(by_label[label]),
                "diverged": sum("diverged" in r for r in by_label[label]),
                "not_run": sum("not_run" in r for r in by_label[label]),
                "why_not_run": ", ".join(sorted({r["not_run"] for r in by_label[label] if "not_run" in r})) or None,
                "mean": mean,
                "min": min(accs, default=None),
                "max": max(accs, default=None),
                "vs_kd": None if mean is None or kd_mean is None else mean - kd_mean,
                "vs_baseline": None if label == "kd" or mean is None or base_mean is None else mean - base_mean,
                "size_bytes": trained[label][0]["size_bytes"] if accs else None,
                "train_s": statistics.mean(r["train_s"] for r in trained[label]) if accs else None,
            }
        )
    return out


def main(argv: list[str] | None = None) -> None:
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
    p.add_argument("--val-size", type=int, help="validation examples held out of training (default: the dataset's, 5000 for fashion-mnist); "
                   "the table compares validation accuracy, or test accuracy with --val-size 0")
    p.add_argument("--tag", required=True, help="results file: ablation-<tag>")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--work-dir", type=Path, help="finished runs and the weights others start from, kept to resume after a kill (default: <out>/work-ablation-<tag>)")
    args = p.parse_args(argv)
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
    work = args.work_dir or args.out / f"work-ablation-{args.tag}"
    arguments = {k: v for k, v in vars(args).items() if k != "work_dir"}
    resumed = open_work_dir(work, json.loads(json.dumps(arguments, default=str)))
    if resumed:
        print(f"resuming {work}: {resumed} runs done before")
    start = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    card = torch.cuda.get_device_name(0) if device == "cuda" else f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"
    data = load_dataset(args.dataset, args.data_dir, args.val_size).subset(args.train_subset, args.test_subset)
    metric, metric_name = ("val_acc", "val. acc.") if data.val_x is not None else ("test_acc", "test acc.")
    teacher_path, teacher = work_teacher(work, data, args.teacher, base.replace(method="fp", epochs=args.teacher_epochs))
    teacher_acc = evaluate(teacher, *((data.val_x, data.val_y) if metric == "val_acc" else (data.test_x, data.test_y)))
    CachedTeacher.build(teacher.to(device), data.train_x, cache_dir() / "logits", device=device)  # once, not once per worker
    data_args = {"dataset": args.dataset, "data_dir": args.data_dir, "val_size": args.val_size, "train_subset": args.train_subset, "test_subset": args.test_subset, "student": args.student}
    threads = max(1, torch.get_num_threads() // args.workers)
    paths = {"teacher": str(teacher_path)}
    paths |= {(label, s): str(work / f"init-{labels.index(label)}-{s}.safetensors") for label in sources for s in args.seeds}
    with worker_pool(args.workers) as pool:

        def run_all(jobs, paths, description):
            """The jobs' rows: those of finished runs read back from the work directory, the others run."""
            files = [work / "jobs" / f"{labels.index(label)}-{s}.json" for label, _, s in jobs]
            todo = [(str(f), *job, base.to_dict(), paths, data_args, threads) for f, job in zip(files, jobs) if not f.exists()]
            with progress_bars() as progress:
                map_jobs(pool, finish, todo, description, progress)
            return [json.loads(f.read_text()) for f in files]

        first = [("kd", {"method": "kd"})] + [v for v in variants if v[0] in sources]
        rows = run_all([(label, changes, s) for label, changes in first for s in args.seeds], paths, "starting points (variant, seed)")
        trained = {(r["variant"], r["seed"]) for r in rows if r["test_acc"] is not None}
        rest_paths = {k: v for k, v in paths.items() if k == "teacher" or k in trained}  # a diverged starting point has no weights
        rest = [(label, changes, s) for label, changes in variants if label not in sources for s in args.seeds]
        rows += run_all(rest, rest_paths, "variants (variant, seed)")
    seconds = time.perf_counter() - start
    summary = summarize(rows, labels, metric)
    setup = (
        f"{card}; student {args.student}; teacher {args.teacher} ({args.teacher_epochs} epochs) {teacher_acc:.2f}% ({metric_name}); "
        f"{args.bits} bits; {args.epochs} epochs unless a variant says otherwise; seeds {args.seeds}; "
        f"train examples {len(data.train_x)}, validation {0 if data.val_x is None else len(data.val_x)}, test {len(data.test_x)}; "
        f"compared on {metric_name}; wall time {seconds:.0f} s"
        + (f", resumed with {resumed} of {len(labels) * len(args.seeds)} runs done before" if resumed else "")
    )
    columns = [
        ("variant", "variant", ""), ("bits", "bits", ""), ("accuracy", f"{metric_name} (%): mean (min–max)", ""),
        ("vs_kd", "vs kd", "+.2f"), ("vs_baseline", "vs baseline", "+.2f"), ("size_bytes", "size (bytes)", ","), ("train_s", "train s", ".0f"),
    ]
    spelled = "\n".join(f"- `{v}`" for v in args.variant)
    table = markdown_table([{**s, "accuracy": accuracy_cell(s)} for s in summary], columns)
    md = f"# Ablation: {args.tag}\n\n{setup}.\n\nVariants (label: TrainConfig overrides; the first is the baseline):\n{spelled}\n\n{table}\n"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"ablation-{args.tag}.json").write_text(json.dumps({"setup": setup, "card": card, "variants": args.variant, "summary": summary, "rows": rows}, indent=1))
    (args.out / f"ablation-{args.tag}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
