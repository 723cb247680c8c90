"""Runs as the CLI and the demo use them: run directories, cached teachers, one method -> one result row."""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import re
import threading
import time
from concurrent.futures import Executor, ProcessPoolExecutor, as_completed
from pathlib import Path

import torch
from torch import nn

from qdistill.data import Dataset
from qdistill.errors import Diverged, QDistillError
from qdistill.files import cache_dir, check_cache_entry
from qdistill.format import inspect_packed, save_packed
from qdistill.models import build_model, load_checkpoint, model_spec, save_checkpoint
from qdistill.quant import detach
from qdistill.report import MetricsLog
from qdistill.runtime import load_packed
from qdistill.tasks import Task, as_task
from qdistill.train import TrainConfig, distributed, train
from qdistill.train.config import SPEED_ONLY

log = logging.getLogger(__name__)


def new_run_dir(path: str | Path | None, prefix: str) -> Path:
    """A fresh directory for a run's outputs; an existing non-empty one is refused so nothing is overwritten."""
    path = Path(path) if path else Path("runs") / f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}"
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise QDistillError(f"run directory {path} already holds files; choose another --run-dir (nothing was overwritten)")
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def run_in(run_dir: Path, made: bool):
    """Run a block in a run directory; if it fails before any step was taken (no state.pt, nothing logged:
    a bad device, unreadable data), remove what the run wrote there, and the directory if this run `made`
    it, so that the same command can be given again. A run that trained is kept, for --resume."""
    try:
        yield
    except BaseException:
        metrics = run_dir / "metrics.jsonl"
        if distributed.is_main() and not os.path.lexists(run_dir / "state.pt") and not (metrics.is_file() and metrics.stat().st_size):
            for name in ("run.json", "config.yaml", "metrics.jsonl"):
                if os.path.lexists(run_dir / name):
                    os.unlink(run_dir / name)
            if made and not any(run_dir.iterdir()):
                run_dir.rmdir()
        raise


# Options added after teachers were cached and shipped, at the values that train exactly as before.
KEY_NEUTRAL = {"optimizer": "sgd", "warmup": 0.0, "topk": 32, "groups": "flat", "zero_point": "float", "scale_dtype": "float32", "relational": 0.0, "hidden_states": 0.0, "bucket_by_name": []}

# Teachers shipped with qdistill, named as in the cache: found when a run asks for the very same teacher.
SHIPPED_TEACHERS = Path(__file__).parent / "assets" / "teachers"


def teacher_file_name(data: Dataset | Task, preset: str, cfg: TrainConfig) -> str:
    """`preset-key.safetensors`, the key a hash of the model, the data and the settings fp training reads.

    Only those settings count: a change of bits or dq epochs reuses the teacher. An option left off
    (None), or at the value that trains as before the option existed (KEY_NEUTRAL), is keyed as if it
    did not exist, so adding an option keeps the cached and shipped teachers."""
    task = as_task(data)
    spec = model_spec(preset, **task.spec_args())
    settings = {k: v for k, v in cfg.fp_only().to_dict().items() if k not in SPEED_ONLY and v is not None and KEY_NEUTRAL.get(k, ...) != v}
    key = hashlib.sha256((json.dumps([spec, settings], sort_keys=True) + task.data_key()).encode()).hexdigest()[:16]
    return f"{preset}-{key}.safetensors"


def get_teacher(data: Dataset | Task, preset: str, cfg: TrainConfig, progress=None) -> nn.Module:
    """A teacher trained once per (preset, data, settings) and kept in the cache; the one shipped with
    qdistill when it is that teacher (`make demo` then trains none). Trained as `qdistill train-teacher` trains it."""
    spec = model_spec(preset, **as_task(data).spec_args())
    name = teacher_file_name(data, preset, cfg)
    cached = cache_dir() / "teachers" / name
    for path in (SHIPPED_TEACHERS / name, cached):
        if os.path.lexists(path):
            try:
                if path is cached:  # (a shipped teacher is installed with qdistill, not written to the cache)
                    check_cache_entry(path)
                return load_checkpoint(path)[0]
            except QDistillError as e:
                log.warning("retraining the teacher, the cached one cannot be used: %s", e)
    cfg = cfg.fp_only()
    torch.manual_seed(cfg.seed)
    teacher = build_model(spec)
    result = train(teacher, data, cfg, progress=progress)
    cached.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        save_checkpoint(teacher, spec, cached, extra={"test": result.test, "task": as_task(data).describe()})
        os.chmod(cached, 0o600)  # saved with the umask's mode: a group-writable teacher would not be trusted
    except OSError as e:
        raise QDistillError(f"cannot replace the cached teacher {cached} ({e.strerror}); remove it or set QDISTILL_CACHE to a folder of your own") from None
    return teacher


def result_row(label: str, result, spec: dict, run_dir: Path, name: str, data) -> dict:
    """Save the trained model (packed when quantized) and describe it as one table row.

    A packed model is loaded back and checked to hold the trained quantized weights bit for bit: the row's
    metrics, the trained model's, are the shipped file's (without evaluating the test split twice)."""
    task = as_task(data)
    cfg = result.config
    params = sum(p.numel() for n, p in result.model.named_parameters() if "parametrizations" not in n.split(".") or n.endswith(".original"))
    quantized = cfg.spec.quantizer is not None
    if quantized:
        # overwrite: the run directory is the run's own (new_run_dir), and a resumed run writes its model again
        path = save_packed(result.model, spec, run_dir / f"{name}.safetensors", info={"method": label, "test": result.test, "config": cfg.to_dict(), "task": task.describe()}, overwrite=True)
        shipped = load_packed(path, model=build_model(spec))[0].state_dict()
        trained = detach(copy.deepcopy(result.model), keep_quantized=True).state_dict()
        differ = sorted(set(shipped) ^ set(trained)) or [k for k in trained if not torch.equal(shipped[k], trained[k].cpu())]
        if differ:
            raise RuntimeError(f"{path}: the loaded model's {', '.join(differ[:3])} differ from the trained quantized model's")
        sizes = inspect_packed(path)
        size, huffman = sizes["disk_bytes"], sizes["huffman_bytes"]
    else:
        path = run_dir / f"{name}.safetensors"
        save_checkpoint(result.model, spec, path, extra={"test": result.test, "config": cfg.to_dict(), "task": task.describe()})
        size, huffman = path.stat().st_size, None
    return {
        "method": label,
        "bits": cfg.bits if quantized else 32,
        "bucket": (cfg.bucket or "global") if quantized else None,
        **{f"val_{k}": v for k, v in (result.val or {"acc": None}).items()},
        **{f"test_{k}": v for k, v in result.test.items()},
        "size_bytes": size,
        "huffman_bytes": huffman,
        "ratio": 4 * params / size,
        "params": params,
        "train_s": result.train_seconds,
        "samples_per_s": result.samples_per_s,
        "file": path.name,
    }


def run_method(
    label: str,
    spec: dict,
    data: Dataset | Task,
    cfg: TrainConfig,
    run_dir: Path,
    teacher: nn.Module | None = None,
    init: nn.Module | None = None,
    progress=None,
    checkpoint=None,
) -> tuple[dict, nn.Module]:
    """Build the student (from `init`'s weights when given), train it with `cfg`, save it, return its row.

    `progress(name, done, total, status)` is told how training goes (`train.loop.Events`).
    `checkpoint` (a `train.state.Checkpoint`) saves the run as it goes and resumes a killed one. Under
    torchrun rank 0 alone saves and evaluates: the other ranks return no row (None)."""
    torch.manual_seed(cfg.seed)
    student = copy.deepcopy(init) if init is not None else build_model(spec)
    log = MetricsLog(run_dir / "metrics.jsonl")
    result = train(
        student, data, cfg, teacher=teacher, cache_dir=cache_dir() / "logits", log=lambda r: log({"run": label, "bits": cfg.bits, **r}), progress=progress, checkpoint=checkpoint
    )
    if not distributed.is_main():
        return None, result.model
    name = re.sub(r"[^A-Za-z0-9]+", "-", label).strip("-") + (f"-{cfg.bits}b" if cfg.spec.quantizer else "")
    row = result_row(label, result, spec, run_dir, name, data)
    log({"run": label, "result": row})
    return row, result.model


def improved_recipe(cfg: TrainConfig) -> TrainConfig:
    """The options that paid in bench/ablation.py (bench/results/ablation-*.md), on top of `cfg`.

    Start from the trained full-precision student (fp for qat, kd for qd; `init` of run_method),
    clip each bucket's range to the least squared error (scale=mse) and, when distilling, use T = 1.
    """
    return cfg.replace(scale="mse", temperature=1.0 if cfg.spec.distill else cfg.temperature)


LOW_BIT_METHODS = ("ptq", "qat", "qd", "dq", "qd+dq")  # what `low_bit_steps` runs by default


def reference_steps(base: TrainConfig) -> list[tuple[str, TrainConfig, str | None]]:
    """fp and kd: the full-precision students the low-bit rows are measured against (and start from). A
    quantizer-only setting of `base` (--scale mse) is left out of them, where it would be refused."""
    full_precision = base.replace(scale="minmax", method="fp")
    return [("fp", full_precision, None), ("kd", full_precision.replace(method="kd"), None)]


def low_bit_steps(base: TrainConfig, bits: int, methods: tuple[str, ...] = LOW_BIT_METHODS, improved: tuple[str, ...] = ()) -> list[tuple[str, TrainConfig, str | None]]:
    """The low-bit `methods` at one bit width, as (label, config, the run whose weights it starts from):
    ptq with buckets and global (from fp), qat, qd, the `improved` ones ("qat", "qd") again with the
    improved recipe (from fp and from kd), dq (points learned on the kd weights) and qd+dq (the qd run's
    points fine-tuned, starting from its own levels)."""
    if "qd+dq" in methods and "qd" not in methods:
        raise QDistillError("qd+dq fine-tunes the points of the qd run: ask for qd too")
    cfg = base.replace(bits=bits)
    learned = cfg.replace(scale="minmax", zero_point="float")  # learned points have neither option: dq and qd+dq leave them out
    steps = []
    if "ptq" in methods:
        steps += [("ptq", cfg.replace(method="ptq"), "fp"), ("ptq (global)", cfg.replace(method="ptq", bucket=None), "fp")]
    if "qat" in methods:
        steps.append(("qat", cfg.replace(method="qat"), None))
    if "qd" in methods:
        steps.append(("qd", cfg.replace(method="qd"), None))
    if "qat" in improved:
        steps.append(("qat (from fp, mse)", improved_recipe(cfg.replace(method="qat")), "fp"))
    if "qd" in improved:
        steps.append(("qd (from kd, mse, T 1)", improved_recipe(cfg.replace(method="qd")), "kd"))
    if "dq" in methods:
        steps.append(("dq", learned.replace(method="dq"), "kd"))
    if "qd+dq" in methods:
        steps.append(("qd+dq", learned.replace(method="dq", points_init="uniform"), "qd"))
    return steps


def run_steps(steps, spec: dict, data: Dataset | Task, run_dir: Path, teacher: nn.Module, models: dict, progress=None) -> list[dict]:
    """Run (label, config, source) steps in order, each from `models[source]`, adding each trained model to
    `models`. A run that diverges gives a row marked diverged, and the runs that start from it (or from a
    source missing from `models`) rows marked not run: one bad run never loses the others' rows."""
    rows = {}
    for label, cfg, source in steps:
        models[label] = None
        mark = {"method": label, "bits": cfg.bits if cfg.spec.quantizer else 32, "test_acc": None}
        if source and models.get(source) is None:
            rows[label] = {**mark, "not_run": f"{source} diverged", "note": f"not run: {source} diverged"}
            continue
        try:
            rows[label], models[label] = run_method(label, spec, data, cfg, run_dir, teacher=teacher, init=models.get(source), progress=progress)
        except Diverged as e:
            rows[label] = {**mark, "diverged": e.record(), "note": f"diverged at step {e.step}"}
            continue
        if source == "qd" and label == "qd+dq":  # its training time includes the qd run it continues
            rows[label]["train_s"] += rows["qd"]["train_s"]
    return list(rows.values())


def steps_job(steps, spec: dict, data: Dataset | Task, run_dir: Path, teacher: nn.Module, models: dict, threads: int) -> tuple[list[dict], dict]:
    """`run_steps` in a worker process with `threads` threads; returns the rows and the full-precision
    models trained (what low-bit steps start from; quantized ones cannot cross processes)."""
    torch.set_num_threads(threads)
    models = dict(models)
    rows = run_steps(steps, spec, data, run_dir, teacher, models)
    return rows, {label: models[label] for label, cfg, _ in steps if cfg.spec.quantizer is None}


def cache_teacher_targets(data: Dataset | Task, teacher: nn.Module, base: TrainConfig, improved: tuple[str, ...] = ("qd",)) -> None:
    """Compute the teacher's cached targets once, before parallel workers look them up: at the base
    temperature and at the improved qd's (top-k targets of language models are kept per temperature)."""
    if base.teacher_logits != "cached" or base.augment:
        return
    temperatures = {base.temperature} | ({improved_recipe(base.replace(method="qd")).temperature} if "qd" in improved else set())
    for t in sorted(temperatures):
        as_task(data).teacher(teacher, base.replace(temperature=t), cache_dir() / "logits")


def _exit_with_parent(parent: int) -> None:
    """In a worker: end the process as soon as its parent is gone (killed, even with SIGKILL), instead of
    finishing a job whose result nobody will read while holding the cores of the rerun."""

    def watch():
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def worker_pool(workers: int) -> ProcessPoolExecutor:
    """Spawned worker processes that end with their parent: a killed run leaves none behind."""
    check_workers(workers)
    return ProcessPoolExecutor(workers, mp_context=torch.multiprocessing.get_context("spawn"), initializer=_exit_with_parent, initargs=(os.getpid(),))


def map_jobs(pool: Executor, fn, jobs: list[tuple], description: str, progress=None) -> list:
    """`pool.map(fn, *zip(*jobs))`, telling `progress(description, done, total)` as jobs finish; results in job order."""
    futures = [pool.submit(fn, *job) for job in jobs]
    progress = progress or (lambda description, done, total: None)
    progress(description, 0, len(futures))
    for done, future in enumerate(as_completed(futures), start=1):
        future.result()  # a failed job stops the run now, with its error
        progress(description, done, len(futures))
    return [f.result() for f in futures]


def check_workers(workers) -> None:
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise QDistillError(f"workers must be a positive integer, got {workers!r}")


def compare_methods(
    spec: dict,
    data: Dataset | Task,
    base: TrainConfig,
    run_dir: Path,
    teacher: nn.Module,
    bits: tuple[int, ...] | list[int],
    methods: tuple[str, ...] = LOW_BIT_METHODS,
    improved: tuple[str, ...] = (),
    progress=None,
    workers: int = 1,
) -> list[dict]:
    """Every method on one student with the same data and schedule; one row each.

    With `workers` > 1, fp and kd train side by side, then one bit width per worker, each on its share
    of the threads (small students leave cores idle otherwise)."""
    check_workers(workers)
    if workers == 1:
        models: dict = {}
        rows = run_steps(reference_steps(base), spec, data, run_dir, teacher, models, progress)
        for b in bits:
            rows += run_steps(low_bit_steps(base, b, methods, improved), spec, data, run_dir, teacher, dict(models), progress)
        return rows
    if teacher is not None:
        cache_teacher_targets(data, teacher, base, improved)
    threads = max(1, torch.get_num_threads() // workers)
    with worker_pool(workers) as pool:
        jobs = [([step], spec, data, run_dir, teacher, {}, threads) for step in reference_steps(base)]
        done = map_jobs(pool, steps_job, jobs, "fp and kd", progress)
        rows, models = [r for rs, _ in done for r in rs], {k: v for _, ms in done for k, v in ms.items()}
        jobs = [(low_bit_steps(base, b, methods, improved), spec, data, run_dir, teacher, models, threads) for b in bits]
        rows += [r for rs, _ in map_jobs(pool, steps_job, jobs, "low-bit methods, one bit width per job", progress) for r in rs]
    return rows
