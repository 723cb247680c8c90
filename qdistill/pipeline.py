"""Runs as the CLI and the demo use them: run directories, cached teachers, one method -> one result row."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import time
from pathlib import Path

import torch
from torch import nn

from qdistill.data import Dataset
from qdistill.distill.teacher import tensor_digest
from qdistill.errors import QDistillError
from qdistill.export import inspect_packed, load_packed, save_packed
from qdistill.models import build_model, load_checkpoint, model_spec, save_checkpoint
from qdistill.report import MetricsLog
from qdistill.train import TrainConfig, evaluate, train
from qdistill.train.config import SPEED_ONLY


def cache_dir() -> Path:
    return Path(os.environ.get("QDISTILL_CACHE", Path.home() / ".cache" / "qdistill"))


def new_run_dir(path: str | Path | None, prefix: str) -> Path:
    """A fresh directory for a run's outputs; an existing non-empty one is refused so nothing is overwritten."""
    path = Path(path) if path else Path("runs") / f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}"
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise QDistillError(f"run directory {path} already holds files; choose another --run-dir (nothing was overwritten)")
    path.mkdir(parents=True, exist_ok=True)
    return path


def get_teacher(data: Dataset, preset: str, cfg: TrainConfig, quiet: bool = False) -> nn.Module:
    """A teacher trained once per (preset, data, settings) and kept in the cache.

    Only the settings that full-precision training reads count: a change of bits or dq epochs reuses the teacher."""
    spec = model_spec(preset, data.train_x.shape[1], data.num_classes)
    cfg = cfg.fp_only()
    # An option left off (None) is keyed as if it did not exist, so adding an option keeps the cached teachers.
    settings = {k: v for k, v in cfg.to_dict().items() if k not in SPEED_ONLY and v is not None}
    key = hashlib.sha256((json.dumps([spec, settings], sort_keys=True) + tensor_digest(data.train_x, data.train_y)).encode()).hexdigest()[:16]
    cached = cache_dir() / "teachers" / f"{preset}-{key}.safetensors"
    if cached.exists():
        try:
            return load_checkpoint(cached)[0]
        except QDistillError as e:
            print(f"warning: retraining the teacher, the cached one is unreadable: {e}")
    teacher = build_model(spec)
    result = train(teacher, data, cfg, quiet=quiet)
    save_checkpoint(teacher, spec, cached, extra={"test_acc": result.test_acc})
    return teacher


def result_row(label: str, result, spec: dict, run_dir: Path, name: str, data: Dataset) -> dict:
    """Save the trained model (packed when quantized) and describe it as one table row.

    A packed model is loaded back and evaluated: the row's accuracy is the shipped file's.
    """
    cfg = result.config
    params = sum(p.numel() for n, p in result.model.named_parameters() if "parametrizations" not in n.split(".") or n.endswith(".original"))
    quantized = cfg.spec.quantizer is not None
    if quantized:
        path = save_packed(result.model, spec, run_dir / f"{name}.safetensors", info={"method": label, "test_acc": result.test_acc, "config": cfg.to_dict()})
        shipped = load_packed(path, model=build_model(spec))[0].to(next(result.model.parameters()).device)
        shipped_acc = evaluate(shipped, data.test_x, data.test_y)
        if shipped_acc != result.test_acc:
            raise RuntimeError(f"{path}: the loaded model scores {shipped_acc}%, the trained quantized model {result.test_acc}%")
        sizes = inspect_packed(path)
        size, huffman = sizes["disk_bytes"], sizes["huffman_bytes"]
    else:
        path = run_dir / f"{name}.safetensors"
        save_checkpoint(result.model, spec, path, extra={"test_acc": result.test_acc, "config": cfg.to_dict()})
        size, huffman = path.stat().st_size, None
    return {
        "method": label,
        "bits": cfg.bits if quantized else 32,
        "bucket": (cfg.bucket or "global") if quantized else None,
        "val_acc": result.val_acc,
        "test_acc": result.test_acc,
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
    data: Dataset,
    cfg: TrainConfig,
    run_dir: Path,
    teacher: nn.Module | None = None,
    init: nn.Module | None = None,
    quiet: bool = False,
    checkpoint=None,
) -> tuple[dict, nn.Module]:
    """Build the student (from `init`'s weights when given), train it with `cfg`, save it, return its row.

    `checkpoint` (a `train.state.Checkpoint`) saves the run as it goes and resumes a killed one."""
    torch.manual_seed(cfg.seed)
    student = copy.deepcopy(init) if init is not None else build_model(spec)
    log = MetricsLog(run_dir / "metrics.jsonl")
    result = train(
        student, data, cfg, teacher=teacher, cache_dir=cache_dir() / "logits", log=lambda r: log({"run": label, "bits": cfg.bits, **r}), quiet=quiet, checkpoint=checkpoint
    )
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


def train_references(spec: dict, data: Dataset, base: TrainConfig, run_dir: Path, teacher: nn.Module, quiet: bool = False):
    """fp and kd: the full-precision students the low-bit rows are measured against (and start from)."""
    fp_row, fp = run_method("fp", spec, data, base.replace(method="fp"), run_dir, quiet=quiet)
    kd_row, kd = run_method("kd", spec, data, base.replace(method="kd"), run_dir, teacher=teacher, quiet=quiet)
    return [fp_row, kd_row], fp, kd


LOW_BIT_METHODS = ("ptq", "qat", "qd", "dq", "qd+dq")  # what `compare_at_bits` runs by default


def compare_at_bits(
    spec: dict,
    data: Dataset,
    base: TrainConfig,
    run_dir: Path,
    teacher: nn.Module,
    bits: int,
    fp: nn.Module,
    kd: nn.Module,
    improved: tuple[str, ...] = (),
    quiet: bool = False,
    methods: tuple[str, ...] = LOW_BIT_METHODS,
) -> list[dict]:
    """The low-bit `methods` at one bit width: ptq with buckets and global (from the fp weights), qat, qd,
    the `improved` ones ("qat", "qd") again with the improved recipe (from fp and from kd), dq (points
    learned on the kd weights) and qd+dq (the qd run's points fine-tuned, starting from its own levels)."""
    if "qd+dq" in methods and "qd" not in methods:
        raise QDistillError("qd+dq fine-tunes the points of the qd run: ask for qd too")
    rows = []

    def run(label, cfg, init=None):
        row, model = run_method(label, spec, data, cfg.replace(bits=bits), run_dir, teacher=teacher, init=init, quiet=quiet)
        rows.append(row)
        return model

    if "ptq" in methods:
        run("ptq", base.replace(method="ptq"), init=fp)
        run("ptq (global)", base.replace(method="ptq", bucket=None), init=fp)
    if "qat" in methods:
        run("qat", base.replace(method="qat"))
    if "qd" in methods:
        qd = run("qd", base.replace(method="qd"))
        qd_seconds = rows[-1]["train_s"]
    if "qat" in improved:
        run("qat (from fp, mse)", improved_recipe(base.replace(method="qat")), init=fp)
    if "qd" in improved:
        run("qd (from kd, mse, T 1)", improved_recipe(base.replace(method="qd")), init=kd)
    if "dq" in methods:
        run("dq", base.replace(method="dq"), init=kd)
    if "qd+dq" in methods:
        run("qd+dq", base.replace(method="dq", points_init="uniform"), init=qd)
        rows[-1]["train_s"] += qd_seconds
    return rows


def compare_methods(
    spec: dict,
    data: Dataset,
    base: TrainConfig,
    run_dir: Path,
    teacher: nn.Module,
    bits: tuple[int, ...] | list[int],
    improved: tuple[str, ...] = (),
    quiet: bool = False,
) -> list[dict]:
    """Every method on one student with the same data and schedule; one row each."""
    rows, fp, kd = train_references(spec, data, base, run_dir, teacher, quiet)
    for b in bits:
        rows += compare_at_bits(spec, data, base, run_dir, teacher, b, fp, kd, improved, quiet)
    return rows
