"""Paper-style accuracy table on Fashion-MNIST: teacher, students, every method, several bit widths and seeds.
With --task lm, the same table in perplexity for language models of the Python documentation.

For each (student, seed): fp and kd, then per bit width ptq (bucket 256 and global, from fp), qat, qd,
the improved recipe for both (`pipeline.improved_recipe`: qat from fp, qd from kd, clipped ranges, T = 1),
dq (points learned on the kd weights) and qd+dq (points fine-tuned after qd). Every method of a student
uses the same epochs and schedule. With --baselines torchao, the tool users pick instead: torchao's QAT
(`QATConfig` + `IntxFakeQuantizeConfig`) on a transformer student's Linear and Embedding weights, trained
with the same distillation loss and schedule as qd (from scratch, and from kd at T = 1 as the improved qd). Jobs, one per (student, seed) for fp and kd, then one per (student,
seed, bit width), run in parallel processes (--workers): small students leave a big GPU mostly idle.
Writes bench/results/accuracy-<tag>.{json,md,png}.

A method whose training diverges (qdistill.errors.Diverged) gets a row marked diverged instead of stopping
the table, and the methods that start from it (qd+dq from qd; ptq and the improved qat from fp; the
improved qd and dq from kd) are marked not run. The table averages the seeds that trained and says how
many diverged.

To resume after a kill, run the same command again. Each job's rows, and the fp and kd weights, are
kept in a work directory (--work-dir, default bench/results/work-accuracy-<tag>/) as soon as the job
ends; a rerun skips the jobs found there. A rerun with other arguments into the same work directory is
refused: delete the directory (or give another --work-dir) to start over.

    python bench/accuracy.py                                  # full table (meant for a GPU)
    python bench/accuracy.py --students tiny --bits 4 2 --seeds 0 --epochs 1 --train-subset 5000   # CPU-sized
    python bench/accuracy.py --students medium --bits 4 2 --methods ptq qat qd --improved qd      # fewer rows
    python bench/accuracy.py --task lm --vocab-size 2048 --seq-len 64 --train-subset 600000 --lr 0.01 \
        --epochs 1 --dq-epochs 1 --teacher-epochs 2 --bits 4 2 --seeds 0 --tag cpu-demo-scale   # the LM demo's scale
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import re
import tempfile
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from qdistill.errors import Diverged  # noqa: E402
from qdistill.models import TRANSFORMER_PRESETS, build_model, count_parameters, load_checkpoint, model_spec, save_checkpoint  # noqa: E402
from qdistill.pipeline import LOW_BIT_METHODS, cache_teacher_targets, get_teacher, low_bit_steps, map_jobs, reference_steps, run_method, run_steps, worker_pool  # noqa: E402
from qdistill.report import METRIC_LABELS, ORDER, accuracy_cell, markdown_table, summarize  # noqa: E402
from qdistill.tasks import TASKS, LanguageModelling, as_task  # noqa: E402
from qdistill.train import TrainConfig  # noqa: E402
from qdistill.tasks.build import build_task  # noqa: E402
from qdistill.ui import progress_bars  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def make_task(data_args: dict):
    """The task as `qdistill distill` builds it from the same flags: Fashion-MNIST (or a dataset hook) in
    memory, or a token corpus (--task lm), cut to the subsets asked for."""
    return build_task(data_args.get("task", "classification"), **{k: v for k, v in data_args.items() if k != "task" and v is not None})


def run_job(student: str, seed: int, bits: int | None, base: dict, paths: dict, data_args: dict, threads: int, methods: dict) -> list[dict]:
    """One process's share: fp and kd of (student, seed) when `bits` is None (the weights of those that
    trained saved to `paths`), else every low-bit method at `bits`, starting from the fp and kd weights
    in `paths` where a method does (`pipeline.run_steps` marks diverged and not-run rows)."""
    torch.set_num_threads(threads)
    data = make_task(data_args)
    teacher = load_checkpoint(paths["teacher"])[0]
    cfg = TrainConfig.from_dict(base).replace(seed=seed)
    spec = model_spec(student, **data.spec_args())
    with tempfile.TemporaryDirectory() as tmp:
        if bits is None:
            models: dict = {}
            rows = run_steps(reference_steps(cfg), spec, data, Path(tmp), teacher, models)
            for m in ("fp", "kd"):
                if models[m] is not None:
                    save_checkpoint(models[m], spec, paths[(m, student, seed)])
        else:
            models = {m: load_checkpoint(paths[(m, student, seed)])[0] for m in ("fp", "kd") if (m, student, seed) in paths}
            rows = run_steps(low_bit_steps(cfg, bits, methods["methods"], methods["improved"]), spec, data, Path(tmp), teacher, models)
            if "torchao" in methods.get("baselines", ()) and student in TRANSFORMER_PRESETS:
                rows += torchao_rows(cfg, bits, spec, data, Path(tmp), teacher, models)
    return [{**row, "method": bucket_label(row, cfg.bucket), "student": student, "seed": seed} for row in rows]


def bucket_label(row: dict, bucket: int | None) -> str:
    """The row's method, marked with its bucket when --bucket moved it from the default: a run at another
    bucket size merges into the same table as rows of their own."""
    default = TrainConfig.__dataclass_fields__["bucket"].default
    return f"{row['method']} (bucket {bucket})" if bucket != default and row.get("bucket") == bucket else row["method"]


def torchao_prepare(model: torch.nn.Module, bits: int) -> torch.nn.Module:
    """torchao 0.18's QAT `prepare` on every Linear and Embedding weight: asymmetric, integer zero point,
    one scale per row (gpt-tiny's rows hold 128 or 344 weights where qdistill's buckets hold 256)."""
    from torchao.quantization import quantize_
    from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig

    weights = IntxFakeQuantizeConfig(getattr(torch, f"int{bits}"), "per_channel", is_symmetric=False)
    quantize_(model, QATConfig(weight_config=weights, step="prepare"), filter_fn=lambda module, name: isinstance(module, (torch.nn.Linear, torch.nn.Embedding)))
    return model


def torchao_rows(cfg: TrainConfig, bits: int, spec: dict, data, run_dir: Path, teacher, models: dict) -> list[dict]:
    """torchao's QAT trained with qdistill's distillation loss and schedule (as kd on the fake-quantized
    model), from scratch like qd and from kd at T = 1 like the improved qd. The model stays torchao's
    fake-quantized fp32 (no packed file); its metrics are those of the quantized weights."""
    rows = []
    for label, run_cfg, source in [("torchao qat+kd", cfg.replace(method="kd"), None), ("torchao qat+kd (from kd, T 1)", cfg.replace(method="kd", temperature=1.0), "kd")]:
        if source and models.get(source) is None:
            rows.append({"method": label, "bits": bits, "test_acc": None, "not_run": f"{source} diverged", "note": f"not run: {source} diverged"})
            continue
        torch.manual_seed(run_cfg.seed)  # as run_method: the same initial weights as qd's
        model = torchao_prepare(copy.deepcopy(models[source]) if source else build_model(spec), bits)
        try:
            row, _ = run_method(label, spec, data, run_cfg, run_dir, teacher=teacher, init=model)
        except Diverged as e:
            rows.append({"method": label, "bits": bits, "test_acc": None, "diverged": e.record(), "note": f"diverged at step {e.step}"})
            continue
        rows.append({**row, "bits": bits, "bucket": "row", "size_bytes": None, "ratio": None, "note": "torchao fake-quantized fp32: no packed file"})
    return rows


def write_json(path: Path, value) -> None:
    """Write then rename: a kill leaves the old file or the new one, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=1))
    os.replace(tmp, path)


NOT_RESULTS = ("workers",)  # how many processes share the jobs: a run resumes with another count


def open_work_dir(work: Path, arguments: dict, defaults: dict | None = None, extendable: tuple[str, ...] = ()) -> int:
    """Make the work directory, or check that the one there holds a run of the same arguments (its rows
    and weights belong to that run); return how many jobs it has finished. An argument the saved run
    did not have (an option added since) counts as equal when it is at its default (`defaults`).
    `extendable`: arguments that only list jobs, each kept under its own name (bits, seeds): a run that
    asks for more reuses the jobs done."""
    saved = work / "arguments.json"
    if saved.exists():
        before = json.loads(saved.read_text())
        before |= {k: v for k, v in (defaults or {}).items() if k not in before and k in arguments}
        before, arguments = ({k: v for k, v in a.items() if k not in NOT_RESULTS + extendable} for a in (before, arguments))
        if before != arguments:
            differ = ", ".join(sorted(k for k in before.keys() | arguments.keys() if before.get(k) != arguments.get(k)))
            raise SystemExit(
                f"{work} holds a run made with other arguments ({differ} differ): run the same command to resume it, "
                f"or give another --work-dir (or delete {work}) to start over"
            )
    else:
        (work / "jobs").mkdir(parents=True, exist_ok=True)
        write_json(saved, arguments)
    return len([f for f in (work / "jobs").glob("*.json") if f.suffixes == [".json"]])  # rows, not a row's extras (x.speed.json)


def work_teacher(work: Path, data, preset: str, cfg: TrainConfig):
    """The teacher of the rows already in `work` (its file), else the cached or newly trained one, kept there."""
    path = work / "teacher.safetensors"
    if path.exists():
        return path, load_checkpoint(path)[0]
    teacher = get_teacher(data, preset, cfg)
    save_checkpoint(teacher, model_spec(preset, **as_task(data).spec_args()), path)
    return path, teacher


def finish(path: str, *job) -> None:
    """Run one job in a worker and keep its rows at once, so that a killed run loses only the jobs under way."""
    write_json(Path(path), run_job(*job))


def plot(summary: list[dict], path: Path, title: str, metric: str = "acc") -> None:
    students = sorted({r["student"] for r in summary}, key=lambda s: next(r["params"] or 0 for r in summary if r["student"] == s))
    fig, axes = plt.subplots(1, len(students), figsize=(6 * len(students), 4), squeeze=False)
    for ax, student in zip(axes[0], students):
        rows = [r for r in summary if r["student"] == student and r["mean"] is not None]  # a diverged method has no point
        for m in [*ORDER, *sorted({r["method"] for r in rows} - set(ORDER))]:
            pts = sorted((r["bits"], r["mean"], r["min"], r["max"]) for r in rows if r["method"] == m and r["bits"] != 32)
            if pts:
                ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[[p[1] - p[2] for p in pts], [p[3] - p[1] for p in pts]], marker="o", capsize=3, label=m)
        for r in rows:
            if r["bits"] == 32:
                ax.axhline(r["mean"], linestyle="--", linewidth=1, color="black" if r["method"] == "kd" else "gray", label=f"{r['method']} fp32")
        params = next(r["params"] for r in summary if r["student"] == student)
        ax.set_title(f"{student} ({params:,} params)" if params else student)
        ax.set_xlabel("bits per weight")
        ax.set_ylabel(f"test {METRIC_LABELS[metric]}")
        trained = [r["mean"] for r in rows if r["bits"] != 32 and r["method"] not in ("ptq", "ptq (global)")]
        if trained and metric == "acc":
            ax.set_ylim(bottom=max(0, min(trained) - 5))
        elif trained:  # perplexity: ptq's can be orders of magnitude above the trained methods'
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=list(TASKS), default="classification")
    p.add_argument("--students", nargs="+", help="(default tiny medium; --task lm: lstm-tiny gpt-tiny)")
    p.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4, 8])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--dq-epochs", type=int, default=2)
    p.add_argument("--lr", type=float, help="learning rate of every method and the teacher (default: the task's)")
    p.add_argument("--teacher", help="(default resnet; --task lm: lstm-small)")
    p.add_argument("--teacher-epochs", type=int, default=10)
    p.add_argument("--methods", nargs="*", choices=LOW_BIT_METHODS, default=list(LOW_BIT_METHODS), help="low-bit methods (fp and kd always run)")
    p.add_argument("--improved", nargs="*", choices=("qat", "qd"), default=["qat", "qd"], help="methods run again with the improved recipe")
    p.add_argument("--baselines", nargs="*", choices=("torchao",), default=[], help="other tools' QAT on the transformer students (lm)")
    p.add_argument("--bucket", type=int, help="weights per quantization bucket of every method (default 256); its rows are labelled with it")
    p.add_argument("--augment", action="store_true", help="augment the data (forces a live teacher)")
    p.add_argument("--workers", type=int, help="parallel processes (default: 12 on a GPU, one per CPU core otherwise)")
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--data-dir")
    p.add_argument("--train-subset", type=int, help="the first N training examples (lm: tokens)")
    p.add_argument("--test-subset", type=int, help="the first N test and validation examples (lm: tokens)")
    p.add_argument("--text-dir", help="lm: a folder of text files (default: the Python 3.11 docs)")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--tag", help="results file suffix (default: gpu or cpu)")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--work-dir", type=Path, help="finished jobs and fp/kd weights, kept to resume after a kill (default: <out>/work-accuracy-<tag>)")
    p.add_argument("--rerender", type=Path, nargs="+", metavar="JSON", help="only rewrite the table and plot of saved runs (several: merged under --tag)")
    args = p.parse_args(argv)
    lm = args.task == "lm"
    args.students = args.students or (["lstm-tiny", "gpt-tiny"] if lm else ["tiny", "medium"])
    args.teacher = args.teacher or ("lstm-small" if lm else "resnet")
    if "qd+dq" in args.methods and "qd" not in args.methods:
        p.error("qd+dq fine-tunes the points of the qd run: ask for qd too")
    if args.rerender:
        return rerender(args.rerender, args.tag, args.out)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tag = args.tag or ("gpu" if device == "cuda" else "cpu")
    name = "lm" if lm else "accuracy"
    work = args.work_dir or args.out / f"work-{name}-{tag}"
    arguments = {k: v for k, v in vars(args).items() if k not in ("work_dir", "rerender")}
    defaults = {k: p.get_default(k) for k in arguments}
    resumed = open_work_dir(work, json.loads(json.dumps(arguments, default=str)), json.loads(json.dumps(defaults, default=str)))
    if resumed:
        print(f"resuming {work}: {resumed} jobs done before")
    start = time.perf_counter()
    card = torch.cuda.get_device_name(0) if device == "cuda" else f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"
    data_args = {k: getattr(args, k) for k in ("task", "dataset", "data_dir", "train_subset", "test_subset", "text_dir", "vocab_size", "seq_len")}
    data = make_task(data_args)
    base = TrainConfig(**{**TASKS[args.task], **({"lr": args.lr} if args.lr else {}), **({"bucket": args.bucket} if args.bucket else {})}, epochs=args.epochs, dq_epochs=args.dq_epochs, augment=args.augment)
    teacher_path, teacher = work_teacher(work, data, args.teacher, base.replace(method="fp", epochs=args.teacher_epochs))
    teacher_metric = data.evaluate(teacher, "test")[data.metric]
    cache_teacher_targets(data, teacher.to(device), base, tuple(args.improved))
    workers = args.workers or (min(12, os.cpu_count() or 1) if device == "cuda" else os.cpu_count() or 1)
    threads = max(1, torch.get_num_threads() // workers)
    paths = {"teacher": str(teacher_path)}
    paths |= {(m, s, seed): str(work / f"{m}-{s}-{seed}.safetensors") for m in ("fp", "kd") for s in args.students for seed in args.seeds}
    methods = {"methods": tuple(args.methods), "improved": tuple(args.improved), "baselines": tuple(args.baselines)}
    with worker_pool(workers) as pool:

        def run_all(jobs, paths, description):
            """The jobs' rows: those of finished jobs read back from the work directory, the others run."""
            files = [work / "jobs" / f"{s}-{seed}-{'fp-kd' if b is None else f'{b}b'}.json" for s, seed, b in jobs]
            todo = [(str(f), *job, base.to_dict(), paths, data_args, threads, methods) for f, job in zip(files, jobs) if not f.exists()]
            with progress_bars() as progress:
                map_jobs(pool, finish, todo, description, progress)
            return [row for f in files for row in json.loads(f.read_text())]

        rows = run_all([(s, seed, None) for s in args.students for seed in args.seeds], paths, "fp and kd (student, seed)")
        trained = {(r["method"], r["student"], r["seed"]) for r in rows if r.get(f"test_{data.metric}") is not None}
        low_bit_paths = {k: v for k, v in paths.items() if k == "teacher" or k in trained}  # a diverged fp or kd has no weights
        rows += run_all([(s, seed, b) for s in args.students for seed in args.seeds for b in args.bits], low_bit_paths, "low-bit methods (student, seed, bits)")
    seconds = time.perf_counter() - start
    jobs = len(args.students) * len(args.seeds) * (1 + len(args.bits))
    setup = (
        f"{card}; teacher {args.teacher} ({count_parameters(teacher):,} params, {args.teacher_epochs} epochs) test {data.metric} {teacher_metric:.2f}; "
        f"{args.epochs} epochs per method, dq {args.dq_epochs} more; seeds {args.seeds}; " + data_summary(data) + f"; wall time {seconds:.0f} s"
        + (f", resumed with {resumed} of {jobs} jobs done before" if resumed else "")
    )
    write_outputs(rows, setup, card, tag, args.out, data.metric)


def data_summary(task) -> str:
    if isinstance(task, LanguageModelling):
        tokens = {s: len(task.corpus.split(s)) for s in ("train", "val", "test")}
        return f"corpus {task.corpus.name} (vocabulary {task.corpus.vocab_size}), tokens train {tokens['train']:,}, val {tokens['val']:,}, test {tokens['test']:,}, windows of {task.seq_len}"
    return f"train examples {len(task.data.train_x)}, test {len(task.data.test_x)}"


def write_outputs(rows: list[dict], setup: str, card: str, tag: str, out: Path, metric: str = "acc") -> None:
    summary = summarize(rows, f"test_{metric}")
    name, title = ("accuracy", "Accuracy on Fashion-MNIST") if metric == "acc" else ("lm", "Perplexity of language models")
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}-{tag}.json").write_text(json.dumps({"setup": setup, "card": card, "metric": metric, "summary": summary, "rows": rows}, indent=1))
    label = "test acc. (%)" if metric == "acc" else "test perplexity"
    columns = [
        ("student", "student", ""), ("method", "method", ""), ("bits", "bits", ""), ("accuracy", f"{label}: mean (min–max)", ""),
        ("seeds", "seeds", ""), ("size_bytes", "size (bytes)", ","), ("ratio", "vs fp32", ".1f"),
    ]
    cells = [{**s, "accuracy": accuracy_cell(s)} for s in summary]
    md = f"# {title} ({tag})\n\n{setup}.\n\n" + markdown_table(cells, columns) + f"\n\n![{name}]({name}-{tag}.png)\n"
    if metric == "ppl":
        md += "\n## Goals (test perplexity, means over seeds; spread: max − min over seeds)\n\n" + "\n".join(f"- {line}" for line in lm_goals(summary, rows)) + "\n"
    (out / f"{name}-{tag}.md").write_text(md)
    plot(summary, out / f"{name}-{tag}.png", f"{title}, {card}", metric)
    print(md)


def lm_goals(summary: list[dict], rows: list[dict] = ()) -> list[str]:
    """The language-model issue's goals, read from a perplexity table: qd at 4 bits within 2 % of kd; at 2 bits
    qd recovers ≥ 80 % of what ptq loses against kd; qd ahead of qat (and of torchao's QAT, where run) by
    more than the seed spread (and, from `rows`, in how many seeds it is ahead of the other method trained
    with the same seed). A goal whose rows are missing is left out."""
    cell = {(r["student"], r["method"], r["bits"]): r for r in summary if r["mean"] is not None}
    per_seed = {(r["student"], r["method"], r["bits"], r["seed"]): r["test_ppl"] for r in rows if r.get("test_ppl") is not None}
    lines = []

    def ahead(student, bits, ours, other):
        a, b = cell.get((student, ours, bits)), cell.get((student, other, bits))
        if a and b:
            spread = max(a["max"] - a["min"], b["max"] - b["min"])
            met = b["mean"] - a["mean"] > spread
            seeds = sorted({k[3] for k in per_seed if k[:3] == (student, ours, bits)} & {k[3] for k in per_seed if k[:3] == (student, other, bits)})
            wins = sum(per_seed[(student, ours, bits, s)] < per_seed[(student, other, bits, s)] for s in seeds)
            paired = f"; ahead in {wins} of {len(seeds)} seeds" if seeds else ""
            lines.append(f"{student}, {bits} bits, {ours} ahead of {other} by more than the spread: {'met' if met else 'not met'} "
                         f"({a['mean']:.2f} against {b['mean']:.2f}, gap {b['mean'] - a['mean']:.2f}, spread {spread:.2f}; seeds {a['seeds']}, {b['seeds']}{paired})")

    for student in dict.fromkeys(r["student"] for r in summary):
        kd, qd4, qd2, ptq2 = (cell.get((student, m, b)) for m, b in (("kd", 32), ("qd", 4), ("qd", 2), ("ptq", 2)))
        if kd and qd4:
            over = 100 * (qd4["mean"] / kd["mean"] - 1)
            lines.append(f"{student}, 4 bits, qd within 2 % of kd: {'met' if over <= 2 else 'not met'} (qd {qd4['mean']:.2f}, kd {kd['mean']:.2f}: {over:+.1f} %)")
        if kd and qd2 and ptq2 and ptq2["mean"] > kd["mean"]:
            share = (ptq2["mean"] - qd2["mean"]) / (ptq2["mean"] - kd["mean"])
            lines.append(f"{student}, 2 bits, qd recovers ≥ 80 % of what ptq loses: {'met' if share >= 0.8 else 'not met'} "
                         f"({100 * share:.0f} %: ptq {ptq2['mean']:.2f}, qd {qd2['mean']:.2f}, kd {kd['mean']:.2f})")
        for bits in (3, 2):
            ahead(student, bits, "qd", "qat")
        for bits in (4, 2):
            for ours, other in TORCHAO_PAIRS:
                ahead(student, bits, ours, other)
    return lines


TORCHAO_PAIRS = [  # (qdistill's row, torchao's trained the same way): from scratch and from kd, at our buckets and torchao's 128
    (ours + suffix, other) for ours, other in (("qd", "torchao qat+kd"), ("qd (from kd, mse, T 1)", "torchao qat+kd (from kd, T 1)")) for suffix in ("", " (bucket 128)")
]


def read_run(path: Path) -> dict:
    """A saved run's JSON, or one line naming what is wrong with the file."""
    try:
        saved = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SystemExit(f"{path}: not a readable results file ({e})") from None
    if not isinstance(saved, dict) or not {"setup", "rows"} <= saved.keys():
        raise SystemExit(f"{path}: not a results file of bench/accuracy.py (no setup and rows)")
    return saved


def rerender(paths: list[Path], tag: str | None = None, out: Path = RESULTS) -> None:
    """Rewrite the table and plot of saved runs from their JSON: after a change to the presentation, or to
    merge runs that split one table's bit widths, students or seeds between them (same setup but for the
    seeds and the wall time)."""
    saved = [read_run(path) for path in paths]
    if len(paths) > 1 and not tag:
        raise SystemExit("merging several runs: name the merged table with --tag")
    seeds = re.compile(r"; seeds \[[^\]]*\]")
    setups = {seeds.sub("", s["setup"].split("; wall time")[0]) for s in saved}
    if len(setups) > 1:
        raise SystemExit("cannot merge runs with different setups:\n" + "\n".join(sorted(setups)))
    rows: dict[tuple, dict] = {}  # fp and kd are in every run; same seeds and threads train the same, so they must agree
    for row in (row for s in saved for row in s["rows"]):
        key = (row["student"], row["method"], row["bits"], row["seed"])
        metric = f"test_{saved[0].get('metric', 'acc')}"
        if key in rows and rows[key].get(metric) != row.get(metric):
            raise SystemExit(f"cannot merge: the runs disagree on {key}: {rows[key].get(metric)} vs {row.get(metric)}")
        rows.setdefault(key, row)
    setup = saved[0]["setup"]
    if len(saved) > 1:  # "...; wall time 7483 s (bits 2 4) + 5210 s (bits 3 8)": merged again, it stays one setup
        walls = []
        for s in saved:
            wall = s["setup"].split("; wall time ")[1]
            bits = " ".join(str(b) for b in sorted({r["bits"] for r in s["rows"]} - {32}))
            walls.append(wall if "(bits" in wall else f"{wall} (bits {bits})")
        every_seed = sorted({r["seed"] for s in saved for r in s["rows"]})
        setup = f"{seeds.sub(f'; seeds {every_seed}', saved[0]['setup'].split('; wall time')[0])}; wall time {' + '.join(walls)}"
    card = saved[0].get("card") or setup.split(";")[0]
    metric = saved[0].get("metric", "acc")
    write_outputs(list(rows.values()), setup, card, tag or paths[0].stem.removeprefix("accuracy-").removeprefix("lm-"), out, metric)


if __name__ == "__main__":
    main()
