"""The benchmark drivers: their arithmetic on rows with known numbers, divergence and resuming with the
training faked, and smoke versions on tiny sizes (whose accuracies are not checked)."""

import importlib.util
import json
import statistics
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from qdistill import pipeline
from qdistill.errors import Diverged

BENCH = Path(__file__).parent.parent / "bench"
TOY = ["--dataset", "tests.conftest:toy_dataset", "--train-subset", "256", "--test-subset", "128", "--teacher", "resnet-small", "--teacher-epochs", "1"]


def load(name):
    if str(BENCH) not in sys.path:  # ablation imports accuracy, its neighbour
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def spy_on_timings(speed, monkeypatch) -> dict:
    """Record the steppers that `median_times` is given and the times it returns."""
    seen = {}
    real = speed.median_times

    def spy(steppers, steps, **kwargs):
        seen["steppers"], seen["times"] = steppers, real(steppers, steps, **kwargs)
        return seen["times"]

    monkeypatch.setattr(speed, "median_times", spy)
    return seen


def test_speed_student_ratios(monkeypatch):
    from qdistill import LearnedPointsQuantizer, UniformQuantizer
    from qdistill.distill import CachedTeacher, LiveTeacher

    speed = load("speed")
    seen = spy_on_timings(speed, monkeypatch)
    row = speed.student_ratios("tiny", torch.device("cpu"), batch=4, steps=1)
    t, steppers = seen["times"], seen["steppers"]
    assert row["qd_cached_over_fp"] == t["qd"] / t["fp"] and row["qd_mse_over_fp"] == t["qd_mse"] / t["fp"]
    assert row["dq_over_qd"] == t["dq"] / t["qd"] and row["live_over_cached"] == t["live"] / t["qd"]
    for key, name in (("fp_ms", "fp"), ("qd_ms", "qd"), ("dq_ms", "dq"), ("qd_live_ms", "live"), ("qd_mse_ms", "qd_mse")):
        assert row[key] == 1e3 * t[name]
        assert t[name] == statistics.median(steppers[name].times) and len(steppers[name].times) == 5  # one burst of 5 steps
    # each time is that of the configuration its name says
    assert steppers["fp"].quantizers == [] and steppers["fp"].teacher is None
    for name, scale in (("qd", "minmax"), ("qd_mse", "mse"), ("live", "minmax")):
        assert steppers[name].quantizers and all(type(q) is UniformQuantizer and (q.bits, q.scale) == (4, scale) for q in steppers[name].quantizers)
    assert isinstance(steppers["qd"].teacher, CachedTeacher) and isinstance(steppers["live"].teacher, LiveTeacher)
    dq = steppers["dq"]
    assert dq.quantizers and all(isinstance(q, LearnedPointsQuantizer) for q in dq.quantizers)
    assert {id(p) for g in dq.opt.param_groups for p in g["params"]} == {id(q.points) for q in dq.quantizers}  # only the points train


def test_speed_against_torchao(monkeypatch):
    pytest.importorskip("torchao")
    from torchao.quantization.qat.linear import FakeQuantizedLinear

    from qdistill import UniformQuantizer

    speed = load("speed")
    seen = spy_on_timings(speed, monkeypatch)
    row = speed.torchao_ratio(torch.device("cpu"), batch=4, steps=1)
    t, steppers = seen["times"], seen["steppers"]
    assert row["ours_over_torchao"] == t["ours"] / t["torchao"]
    assert (row["ours_ms"], row["torchao_ms"], row["fp_ms"]) == (1e3 * t["ours"], 1e3 * t["torchao"], 1e3 * t["fp"])
    ours = steppers["ours"].quantizers
    assert len(ours) == 3 and all(type(q) is UniformQuantizer and (q.bits, q.bucket) == (4, 256) for q in ours)
    theirs = [m for m in steppers["torchao"].model.modules() if isinstance(m, FakeQuantizedLinear)]
    assert len(theirs) == 3 and steppers["torchao"].quantizers == []
    assert all(m.weight_fake_quantizer.config.group_size == 256 for m in theirs)
    assert steppers["fp"].quantizers == [] and not any(isinstance(m, FakeQuantizedLinear) for m in steppers["fp"].model.modules())


def row(method, bits, seed, acc, student="tiny", **extra):
    """A result row as the drivers keep them; accuracy None with `extra` marking why."""
    if acc is None:
        return {"student": student, "method": method, "bits": bits, "seed": seed, "test_acc": None, **extra}
    return {"student": student, "method": method, "bits": bits, "seed": seed, "test_acc": acc, "params": 100, "size_bytes": 400 if bits == 32 else 50}


DIVERGED = {"diverged": {"phase": "qd 2b", "step": 12, "loss": float("nan")}}


def test_accuracy_summary_excludes_and_counts_diverged_seeds():
    accuracy = load("accuracy")
    rows = [row("fp", 32, s, a) for s, a in enumerate((90.0, 91.0, 92.5))]
    rows += [row("qd", 2, 0, 92.56), row("qd", 2, 1, None, **DIVERGED), row("qd", 2, 2, 91.84)]
    rows += [row("qat", 2, s, None, **DIVERGED) for s in range(3)]
    rows += [row("qd+dq", 2, 0, 92.0), row("qd+dq", 2, 1, None, not_run="qd diverged"), row("qd+dq", 2, 2, 93.0)]
    summary = {r["method"]: r for r in accuracy.summarize(rows)}
    fp, qd, qat, qddq = summary["fp"], summary["qd"], summary["qat"], summary["qd+dq"]
    assert (fp["mean"], fp["min"], fp["max"], fp["seeds"], fp["diverged"]) == (91.16666666666667, 90.0, 92.5, 3, 0)
    assert (qd["mean"], qd["min"], qd["max"], qd["seeds"], qd["diverged"]) == (pytest.approx(92.2), 91.84, 92.56, 3, 1)
    assert (qd["size_bytes"], qd["ratio"]) == (50, 8.0)  # 100 fp32 params in 50 bytes
    assert accuracy.accuracy_cell(fp) == "91.17 (90.00–92.50)"
    assert accuracy.accuracy_cell(qd) == "92.20 (91.84–92.56), 1/3 diverged"
    assert (qat["mean"], qat["min"], qat["max"], qat["ratio"]) == (None, None, None, None)
    assert accuracy.accuracy_cell(qat) == "diverged (3/3)"
    assert accuracy.accuracy_cell(qddq) == "92.50 (92.00–93.00), 1/3 not run (qd diverged)"


def test_accuracy_job_marks_a_diverged_method_and_what_starts_from_it(tmp_path, monkeypatch):
    """qd diverges: ptq and qat keep their rows, qd+dq (from qd) is not run; kd diverges: dq and the
    improved qd (from kd) are not run in the next job."""
    from qdistill.models import build_model, model_spec, save_checkpoint

    accuracy = load("accuracy")
    calls = []

    def fake_run_method(label, spec, data, cfg, run_dir, teacher=None, init=None, progress=None):
        calls.append(label)
        if label in ("qd", "kd"):
            raise Diverged(f"{label} {cfg.bits}b", 12, float("inf"), "loss exploded")
        bits = cfg.bits if cfg.spec.quantizer is not None else 32
        return {"method": label, "bits": bits, "test_acc": 50.0, "params": 10, "size_bytes": 5, "train_s": 1.0}, build_model(spec)

    monkeypatch.setattr(pipeline, "run_method", fake_run_method)
    save_checkpoint(build_model(model_spec("resnet-small", 1, 4)), model_spec("resnet-small", 1, 4), tmp_path / "t.safetensors")
    paths = {"teacher": str(tmp_path / "t.safetensors"), **{(m, "tiny", 0): str(tmp_path / f"{m}.safetensors") for m in ("fp", "kd")}}
    data_args = {"dataset": "tests.conftest:toy_dataset", "data_dir": None, "train_subset": 64, "test_subset": 32}
    base = accuracy.TrainConfig(epochs=1).to_dict()
    every = {"methods": accuracy.LOW_BIT_METHODS, "improved": ("qat", "qd")}
    refs = accuracy.run_job("tiny", 0, None, base, paths, data_args, 2, every)
    assert [(r["method"], r["test_acc"]) for r in refs] == [("fp", 50.0), ("kd", None)]
    assert refs[1]["diverged"] == {"phase": "kd 4b", "step": 12, "loss": "inf"} and refs[1]["bits"] == 32
    assert Path(paths[("fp", "tiny", 0)]).exists() and not Path(paths[("kd", "tiny", 0)]).exists()
    calls.clear()
    low = accuracy.run_job("tiny", 0, 2, base, {k: v for k, v in paths.items() if k != ("kd", "tiny", 0)}, data_args, 2, every)
    assert [r["method"] for r in low] == ["ptq", "ptq (global)", "qat", "qd", "qat (from fp, mse)", "qd (from kd, mse, T 1)", "dq", "qd+dq"]
    assert calls == ["ptq", "ptq (global)", "qat", "qd", "qat (from fp, mse)"]
    by = {r["method"]: r for r in low}
    assert all(by[m]["test_acc"] == 50.0 and by[m]["bits"] == 2 for m in ("ptq", "ptq (global)", "qat", "qat (from fp, mse)"))
    assert by["qd"]["test_acc"] is None and by["qd"]["diverged"]["phase"] == "qd 2b"
    assert by["qd+dq"] == {"method": "qd+dq", "bits": 2, "test_acc": None, "not_run": "qd diverged", "note": "not run: qd diverged", "student": "tiny", "seed": 0}
    assert by["dq"]["not_run"] == by["qd (from kd, mse, T 1)"]["not_run"] == "kd diverged"


def test_accuracy_table_smoke(tmp_path, fashion_mnist):
    from qdistill.data import load_dataset
    from qdistill.models import build_model, model_spec, save_checkpoint
    from qdistill.train import TrainConfig, train

    accuracy = load("accuracy")
    data_args = {"dataset": "fashion-mnist", "data_dir": str(fashion_mnist), "train_subset": 512, "test_subset": 256}
    data = load_dataset("fashion-mnist", fashion_mnist).subset(512, 256)
    teacher = build_model(model_spec("resnet-small"))
    train(teacher, data, TrainConfig(method="fp", epochs=1))
    save_checkpoint(teacher, model_spec("resnet-small"), tmp_path / "t.safetensors")
    paths = {"teacher": str(tmp_path / "t.safetensors"), **{(m, "tiny", 0): str(tmp_path / f"{m}.safetensors") for m in ("fp", "kd")}}
    base = TrainConfig(epochs=1).to_dict()
    every = {"methods": accuracy.LOW_BIT_METHODS, "improved": ("qat", "qd")}
    rows = accuracy.run_job("tiny", 0, None, base, paths, data_args, 2, every) + accuracy.run_job("tiny", 0, 2, base, paths, data_args, 2, every)
    summary = accuracy.summarize(rows)
    assert [r["method"] for r in summary] == accuracy.ORDER
    fewer = accuracy.run_job("tiny", 0, 4, base, paths, data_args, 2, {"methods": ("qat", "qd"), "improved": ("qd",)})
    assert [r["method"] for r in fewer] == ["qat", "qd", "qd (from kd, mse, T 1)"]
    accuracy.plot(summary, tmp_path / "a.png", "smoke")
    assert (tmp_path / "a.png").stat().st_size > 0


def test_torchao_baseline_fake_quantizes_every_weight_and_trains_with_distillation(tmp_path):
    """The torchao rows of the LM table: every Linear and Embedding weight on 2^bits levels per row (the tied
    head too, still tied), trained from scratch and from kd; a diverged kd leaves its row not run."""
    from qdistill.models import build_model, model_spec
    from qdistill.tasks import TASKS, LanguageModelling
    from qdistill.train import TrainConfig
    from tests.tasks.test_language import corpus

    accuracy = load("accuracy")
    spec = model_spec("gpt-tiny", num_classes=11)
    model = accuracy.torchao_prepare(build_model(spec), 2)
    quantized = [m for m in model.modules() if hasattr(m, "weight_fake_quantizer")]
    assert len(quantized) == 2 * 7 + 2  # 7 Linear per layer, the embedding and the head
    assert model.lm_head.weight is model.model.embed_tokens.weight
    for module in quantized:
        levels = module.weight_fake_quantizer(module.weight.detach())
        assert max(len(row.unique()) for row in levels) <= 4

    task = LanguageModelling(corpus(n_train=800), seq_len=16)
    cfg = TrainConfig(**{**TASKS["lm"], "batch_size": 8}, epochs=1)
    teacher, kd = build_model(spec).eval(), build_model(spec)
    rows = accuracy.torchao_rows(cfg, 2, spec, task, tmp_path, teacher, {"kd": kd})
    assert [(r["method"], r["bits"], r["size_bytes"]) for r in rows] == [("torchao qat+kd", 2, None), ("torchao qat+kd (from kd, T 1)", 2, None)]
    assert all(0 < r["test_ppl"] < 1e4 for r in rows)
    not_run = accuracy.torchao_rows(cfg, 2, spec, task, tmp_path, teacher, {"kd": None})
    assert not_run[1]["not_run"] == "kd diverged" and not_run[0]["test_ppl"] > 0


def test_accuracy_resumes_after_a_kill(tmp_path, monkeypatch):
    """A run stopped in the middle keeps the jobs it finished; the same command runs only the rest, and
    other arguments into the same work directory are refused."""
    accuracy = load("accuracy")
    monkeypatch.setattr(accuracy, "worker_pool", lambda workers: ThreadPoolExecutor(1))  # the fake job below, in-process
    calls, killed = [], {("tiny", 0, 2)}

    def fake_job(student, seed, bits, base, paths, data_args, threads, methods):
        calls.append((student, seed, bits))
        if (student, seed, bits) in killed:
            raise RuntimeError("killed")
        if bits is None:
            fp = row("fp", 32, seed, 80.0 + seed, student)
            return [fp, row("kd", 32, seed, None, student, **DIVERGED) if seed == 1 else row("kd", 32, seed, 85.0, student)]
        assert (("kd", student, seed) in paths) == (seed == 0)  # a diverged kd leaves no weights to start from
        return [row("qd", bits, seed, 70.0 + seed + bits, student)]

    monkeypatch.setattr(accuracy, "run_job", fake_job)
    args = ["--students", "tiny", "--bits", "4", "2", "--seeds", "0", "1", "--epochs", "1", "--methods", "qd", "--improved", "--workers", "1"]
    args += [*TOY, "--tag", "t", "--out", str(tmp_path)]
    every = [("tiny", 0, None), ("tiny", 1, None), ("tiny", 0, 4), ("tiny", 0, 2), ("tiny", 1, 4), ("tiny", 1, 2)]
    with pytest.raises(RuntimeError, match="killed"):
        accuracy.main(args)
    assert calls == every
    work = tmp_path / "work-accuracy-t"
    assert len(list((work / "jobs").glob("*.json"))) == 5 and (work / "teacher.safetensors").exists()
    calls.clear()
    killed.clear()
    accuracy.main(args)
    assert calls == [("tiny", 0, 2)]
    saved = json.loads((tmp_path / "accuracy-t.json").read_text())
    assert "resumed with 5 of 6 jobs done before" in saved["setup"]
    summary = {(r["method"], r["bits"]): r for r in saved["summary"]}
    assert summary[("qd", 4)]["mean"] == 74.5 and summary[("qd", 2)]["mean"] == 72.5  # rows of both runs
    assert accuracy.accuracy_cell(summary[("kd", 32)]) == "85.00 (85.00–85.00), 1/2 diverged"
    calls.clear()
    accuracy.main(args)
    accuracy.main([*args, "--workers", "2"])  # how many processes share the jobs is not part of the run
    assert calls == []
    with pytest.raises(SystemExit, match=r"other arguments \(epochs differ\)"):
        accuracy.main([*args, "--epochs", "2"])
    saved_args = json.loads((work / "arguments.json").read_text())
    del saved_args["baselines"]  # a run saved before this option existed resumes while it keeps its default
    (work / "arguments.json").write_text(json.dumps(saved_args))
    accuracy.main(args)
    with pytest.raises(SystemExit, match=r"baselines differ"):
        accuracy.main([*args, "--baselines", "torchao"])
    assert calls == []


def test_accuracy_labels_rows_of_another_bucket_size():
    """A --bucket run merges into the default run's table as rows of its own; global and torchao rows keep their labels."""
    accuracy = load("accuracy")
    assert accuracy.bucket_label({"method": "qd", "bucket": 128}, 128) == "qd (bucket 128)"
    assert accuracy.bucket_label({"method": "ptq (global)", "bucket": "global"}, 128) == "ptq (global)"
    assert accuracy.bucket_label({"method": "torchao qat+kd", "bucket": "row"}, 128) == "torchao qat+kd"
    assert accuracy.bucket_label({"method": "qd", "bucket": 256}, 256) == "qd"
    assert accuracy.bucket_label({"method": "kd", "bucket": None}, 128) == "kd"


def test_accuracy_rerender_merges_runs(tmp_path):
    accuracy = load("accuracy")

    def save(name, bits, wall, kd_acc=90.0):
        rows = [row("fp", 32, 0, 89.0), row("kd", 32, 0, kd_acc), row("qd", bits, 0, 80.0 + bits)]
        path = tmp_path / f"accuracy-{name}.json"
        path.write_text(json.dumps({"setup": f"CPU; 2 epochs; wall time {wall} s", "card": "CPU", "rows": rows}))
        return path

    first, second = save("a", 2, 10), save("b", 4, 20)
    with pytest.raises(SystemExit, match="--tag"):
        accuracy.rerender([first, second], out=tmp_path)
    accuracy.rerender([first, second], "merged", tmp_path)
    merged = json.loads((tmp_path / "accuracy-merged.json").read_text())
    assert [(r["method"], r["bits"]) for r in merged["summary"]] == [("fp", 32), ("kd", 32), ("qd", 4), ("qd", 2)]
    assert merged["setup"] == "CPU; 2 epochs; wall time 10 s (bits 2) + 20 s (bits 4)"
    accuracy.rerender([tmp_path / "accuracy-merged.json", save("e", 8, 30)], "again", tmp_path)
    again = json.loads((tmp_path / "accuracy-again.json").read_text())
    assert again["setup"] == "CPU; 2 epochs; wall time 10 s (bits 2) + 20 s (bits 4) + 30 s (bits 8)"
    assert [r["bits"] for r in again["summary"]] == [32, 32, 8, 4, 2]
    with pytest.raises(SystemExit, match="disagree on .*'kd'"):
        accuracy.rerender([first, save("c", 8, 30, kd_acc=91.0)], "bad", tmp_path)
    seed_runs = []
    for seed in (0, 1):  # runs that split the seeds merge, the setup naming them all
        path = tmp_path / f"accuracy-s{seed}.json"
        path.write_text(json.dumps({"setup": f"CPU; seeds [{seed}]; 2 epochs; wall time 5 s", "card": "CPU", "rows": [row("qd", 2, seed, 80.0 + seed)]}))
        seed_runs.append(path)
    accuracy.rerender(seed_runs, "seeds", tmp_path)
    assert json.loads((tmp_path / "accuracy-seeds.json").read_text())["setup"] == "CPU; seeds [0, 1]; 2 epochs; wall time 5 s (bits 2) + 5 s (bits 2)"
    other = tmp_path / "accuracy-d.json"
    other.write_text(json.dumps({**json.loads(first.read_text()), "setup": "CPU; 4 epochs; wall time 5 s"}))
    with pytest.raises(SystemExit, match="different setups"):
        accuracy.rerender([first, other], "bad", tmp_path)
    with pytest.raises(SystemExit, match="missing.json: not a readable results file"):
        accuracy.rerender([first, tmp_path / "missing.json"], "bad", tmp_path)
    (tmp_path / "other.json").write_text("[]")
    with pytest.raises(SystemExit, match="other.json: not a results file"):
        accuracy.rerender([tmp_path / "other.json"], "bad", tmp_path)
    assert not (tmp_path / "accuracy-bad.json").exists()


def test_accuracy_rerender_with_diverged_rows(tmp_path):
    accuracy = load("accuracy")
    rows = [row("fp", 32, s, 90.0 + s) for s in range(3)] + [row("kd", 32, s, 91.0) for s in range(3)]
    rows += [row("qd", 2, s, None, **DIVERGED) for s in range(3)] + [row("qd+dq", 2, s, None, not_run="qd diverged") for s in range(3)]
    rows += [row("qat", 2, 0, 88.0), row("qat", 2, 1, 86.0), row("qat", 2, 2, None, **DIVERGED)]
    path = tmp_path / "accuracy-x.json"
    path.write_text(json.dumps({"setup": "CPU; wall time 5 s", "card": "CPU", "rows": rows}))
    accuracy.rerender([path], out=tmp_path)
    md = (tmp_path / "accuracy-x.md").read_text()
    assert "| tiny | qd | 2 | diverged (3/3) | 3 |" in md
    assert "| tiny | qd+dq | 2 | 3/3 not run (qd diverged) | 3 |" in md
    assert "| tiny | qat | 2 | 87.00 (86.00–88.00), 1/3 diverged | 3 | 50 | 8.0 |" in md
    assert (tmp_path / "accuracy-x.png").stat().st_size > 0


def test_ablation_variant_parsing():
    ablation = load("ablation")
    assert ablation.parse_variant("qd from kd, T=4: init=kd, temperature=4, scale=mse") == (
        "qd from kd, T=4",
        {"init": "kd", "temperature": 4, "scale": "mse"},
    )
    assert ablation.parse_variant("qd") == ("qd", {})
    with pytest.raises(SystemExit, match="is not key=value"):
        ablation.parse_variant("bad: epochs")


def variant_row(label, seed, acc, bits=2, **extra):
    if acc is None:
        return {"variant": label, "seed": seed, "bits": bits, "test_acc": None, **extra}
    return {"variant": label, "seed": seed, "bits": bits, "test_acc": acc, "size_bytes": 50, "train_s": 10.0 + seed}


def test_ablation_summary_gains():
    ablation = load("ablation")
    rows = [variant_row("kd", s, a, bits=32) for s, a in enumerate((90.0, 92.0, 91.0))]
    rows += [variant_row("qd", s, a) for s, a in enumerate((80.0, 84.0, 85.0))]
    rows += [variant_row("mse", 0, 86.0), variant_row("mse", 1, None, **DIVERGED), variant_row("mse", 2, 88.0)]
    rows += [variant_row("bad", s, None, **DIVERGED) for s in range(3)]
    rows += [variant_row("from bad", s, None, not_run="bad diverged") for s in range(3)]
    summary = {r["variant"]: r for r in ablation.summarize(rows, ["kd", "qd", "mse", "bad", "from bad"], metric="test_acc")}
    kd, qd, mse, bad = summary["kd"], summary["qd"], summary["mse"], summary["bad"]
    assert (kd["mean"], kd["vs_kd"], kd["vs_baseline"]) == (91.0, 0.0, None)
    assert (qd["mean"], qd["vs_kd"], qd["vs_baseline"]) == (83.0, -8.0, 0.0)
    assert (mse["mean"], mse["min"], mse["max"], mse["vs_kd"], mse["vs_baseline"]) == (87.0, 86.0, 88.0, -4.0, 4.0)
    assert (mse["diverged"], mse["seeds"], mse["train_s"]) == (1, 3, 11.0)  # the mean of seeds 0 and 2
    assert ablation.accuracy_cell(mse) == "87.00 (86.00–88.00), 1/3 diverged"
    assert (bad["mean"], bad["vs_kd"], bad["vs_baseline"], bad["train_s"]) == (None, None, None, None)
    assert ablation.accuracy_cell(bad) == "diverged (3/3)"
    assert ablation.accuracy_cell(summary["from bad"]) == "3/3 not run (bad diverged)"


def test_ablation_marks_diverged_runs(tmp_path, monkeypatch):
    from qdistill.models import build_model, model_spec, save_checkpoint

    ablation = load("ablation")

    def fake_run_method(label, spec, data, cfg, run_dir, teacher=None, init=None, progress=None):
        raise Diverged(f"{cfg.method} {cfg.bits}b", 3, float("nan"), "non-finite loss")

    monkeypatch.setattr(ablation, "run_method", fake_run_method)
    save_checkpoint(build_model(model_spec("resnet-small", 1, 4)), model_spec("resnet-small", 1, 4), tmp_path / "t.safetensors")
    paths = {"teacher": str(tmp_path / "t.safetensors"), ("kd", 0): str(tmp_path / "kd0.safetensors")}
    data_args = {"dataset": "tests.conftest:toy_dataset", "data_dir": None, "val_size": None, "train_subset": 64, "test_subset": 32, "student": "tiny"}
    base = ablation.TrainConfig(epochs=1, bits=2).to_dict()
    kd = ablation.run_one("kd", {"method": "kd"}, 0, base, paths, data_args, threads=2)
    assert kd["test_acc"] is None and kd["bits"] == 32 and kd["diverged"]["phase"] == "kd 2b" and kd["diverged"]["step"] == 3
    assert not Path(paths[("kd", 0)]).exists()
    from_kd = ablation.run_one("from kd", {"init": "kd"}, 0, base, {"teacher": paths["teacher"]}, data_args, threads=2)
    assert from_kd == {"variant": "from kd", "seed": 0, "bits": 2, "test_acc": None, "not_run": "kd diverged"}


def test_ablation_smoke(tmp_path, fashion_mnist):
    from qdistill.models import build_model, model_spec, save_checkpoint
    from qdistill.train import TrainConfig

    ablation = load("ablation")
    data_args = {"dataset": "fashion-mnist", "data_dir": str(fashion_mnist), "val_size": None, "train_subset": 256, "test_subset": 128, "student": "tiny"}
    paths = {"teacher": str(tmp_path / "t.safetensors"), ("kd", 0): str(tmp_path / "kd0.safetensors")}
    save_checkpoint(build_model(model_spec("resnet-small")), model_spec("resnet-small"), paths["teacher"])
    base = TrainConfig(epochs=1, bits=2).to_dict()
    rows = [ablation.run_one("kd", {"method": "kd"}, 0, base, paths, data_args, threads=2)]
    assert Path(paths[("kd", 0)]).exists()  # left for the variants that start from kd
    for label, changes in (("qd", {}), ("mse from kd", {"init": "kd", "scale": "mse"})):
        rows.append(ablation.run_one(label, changes, 0, base, paths, data_args, threads=2))
    assert all(r["val_acc"] is not None for r in rows)  # compared on the validation split
    summary = ablation.summarize(rows, ["kd", "qd", "mse from kd"])
    assert [(r["variant"], r["bits"], r["seeds"], r["diverged"]) for r in summary] == [("kd", 32, 1, 0), ("qd", 2, 1, 0), ("mse from kd", 2, 1, 0)]
    assert [r["mean"] for r in summary] == [r["val_acc"] for r in rows]
    assert all(0 <= r["mean"] <= 100 and r["size_bytes"] > 0 for r in summary)


def test_ablation_resumes_after_a_kill(tmp_path, monkeypatch):
    ablation = load("ablation")
    monkeypatch.setattr(ablation, "worker_pool", lambda workers: ThreadPoolExecutor(1))
    calls, killed = [], {("mse", 1)}

    def fake_run(label, changes, seed, base, paths, data_args, threads):
        calls.append((label, seed))
        if (label, seed) in killed:
            raise RuntimeError("killed")
        return variant_row(label, seed, 80.0 + seed, bits=32 if label == "kd" else 2)

    monkeypatch.setattr(ablation, "run_one", fake_run)
    args = ["--variant", "qd", "--variant", "mse: scale=mse", "--seeds", "0", "1", "--bits", "2", "--epochs", "1", "--workers", "1"]
    args += [*TOY, "--tag", "t", "--out", str(tmp_path)]
    with pytest.raises(RuntimeError, match="killed"):
        ablation.main(args)
    assert calls == [("kd", 0), ("kd", 1), ("qd", 0), ("qd", 1), ("mse", 0), ("mse", 1)]
    calls.clear()
    killed.clear()
    ablation.main(args)
    assert calls == [("mse", 1)]
    saved = json.loads((tmp_path / "ablation-t.json").read_text())
    assert "resumed with 5 of 6 runs done before" in saved["setup"] and len(saved["rows"]) == 6
    with pytest.raises(SystemExit, match=r"other arguments \(seeds differ\)"):
        ablation.main([*args, "--seeds", "0"])
    assert calls == [("mse", 1)]


def test_language_model_table_end_to_end(tmp_path, monkeypatch):
    """bench/accuracy.py --task lm: the same table in perplexity, from a folder of text."""
    from tests.test_cli import text_folder

    monkeypatch.setenv("QDISTILL_CACHE", str(tmp_path / "cache"))
    accuracy = load("accuracy")
    monkeypatch.setattr(accuracy, "worker_pool", lambda workers: ThreadPoolExecutor(1))  # in-process: faster here
    args = ["--task", "lm", "--text-dir", str(text_folder(tmp_path / "texts")), "--vocab-size", "300", "--seq-len", "32",
            "--students", "lstm-tiny", "--teacher", "lstm-tiny", "--bits", "2", "--seeds", "0", "--epochs", "1", "--teacher-epochs", "1",
            "--methods", "ptq", "qd", "--improved", "qd", "--workers", "1", "--out", str(tmp_path / "out"), "--tag", "t"]
    accuracy.main(args)
    saved = json.loads((tmp_path / "out" / "lm-t.json").read_text())
    assert saved["metric"] == "ppl" and [s["method"] for s in saved["summary"]] == ["fp", "kd", "ptq (global)", "ptq", "qd", "qd (from kd, mse, T 1)"]
    assert all(r["test_ppl"] > 1 for r in saved["rows"])
    assert "test perplexity" in (tmp_path / "out" / "lm-t.md").read_text() and (tmp_path / "out" / "lm-t.png").exists()


def test_embedding_table_smoke_and_resume(tmp_path, monkeypatch):
    """bench/embedding.py on a tiny BERT: the teacher's row agrees with itself, every method and bit width
    gets a row, and a second run reads the rows back instead of training again; speed is measured in a
    pass of its own, left out with --no-speed and done (once) by the next run without it."""
    from tests.tasks.test_embedding import bert, rest_folder, tokenizer

    embedding = load("embedding")
    teacher = bert(pooler=True)
    teacher.config.architectures = ["BertModel"]
    teacher.save_pretrained(tmp_path / "bert")
    tokenizer().save(str(tmp_path / "bert" / "tokenizer.json"))
    monkeypatch.setattr(embedding, "worker_pool", lambda workers: ThreadPoolExecutor(1))
    args = ["--model-dir", str(tmp_path / "bert"), "--text-dir", str(rest_folder(tmp_path / "texts")), "--bits", "4", "--seeds", "0", "--max-len", "16",
            "--batch-size", "8", "--lr", "1e-3", "--out", str(tmp_path / "out"), "--tag", "t"]
    embedding.main(args + ["--no-speed"])
    saved = json.loads((tmp_path / "out" / "embedding-t.json").read_text())
    rows = {r["method"]: r for r in saved["rows"]}
    assert set(rows) == {"teacher", "ptq", "ptq (mse)", "qd"}
    assert rows["teacher"]["test_cos"] == pytest.approx(1.0, abs=1e-5) and rows["teacher"]["test_nbr10"] == 1.0
    assert all(r["size_bytes"] < rows["teacher"]["size_bytes"] / 3 for m, r in rows.items() if m != "teacher")
    assert not any("sentences_per_s" in r for r in rows.values())
    monkeypatch.setattr(embedding, "run_job", lambda *a: pytest.fail("ran a finished job again"))
    embedding.main(args)
    saved = json.loads((tmp_path / "out" / "embedding-t.json").read_text())
    assert all(r["sentences_per_s"] > 0 for r in saved["rows"])
    monkeypatch.setattr(embedding, "sentences_per_s", lambda *a: pytest.fail("measured a finished job's speed again"))
    embedding.main(args)
    embedding.main(args + ["--bits", "4", "2", "--methods", "ptq", "qd (mse)", "--done-only"])  # runs nothing: tabulates what was done
    saved = json.loads((tmp_path / "out" / "embedding-t.json").read_text())
    assert [(r["method"], r["bits"]) for r in saved["rows"]] == [("teacher", 32), ("ptq", 4)]
    ran = []  # more bits, the rest the same: only the new jobs run
    monkeypatch.setattr(embedding, "run_job", lambda method, bits, seed, *a: ran.append((method, bits)) or {**rows[method], "bits": bits})
    embedding.main([*args[:args.index("--bits") + 2], "2", *args[args.index("--bits") + 2:], "--no-speed"])
    assert sorted(ran) == [("ptq", 2), ("ptq (mse)", 2), ("qd", 2)]
    with pytest.raises(SystemExit, match="config differ"):  # another learning rate: not the same table
        embedding.main([*args, "--lr", "1e-2"])


def test_lm_goals_are_read_from_the_table():
    accuracy = load("accuracy")

    def cell(method, bits, values, student="s"):
        return {"student": student, "method": method, "bits": bits, "seeds": len(values), "mean": sum(values) / len(values), "min": min(values), "max": max(values)}

    summary = [cell("kd", 32, [100, 100]), cell("qd", 4, [101, 102]), cell("ptq", 2, [200]), cell("qd", 2, [118, 122]), cell("qat", 2, [123, 125]),
               cell("qat", 3, [130, 140]), cell("qd", 3, [110, 112]), cell("torchao qat+kd", 2, [110, 111])]
    goals = accuracy.lm_goals(summary)
    assert goals[0] == "s, 4 bits, qd within 2 % of kd: met (qd 101.50, kd 100.00: +1.5 %)"
    assert goals[1].startswith("s, 2 bits, qd recovers ≥ 80 % of what ptq loses: met (80 %")
    assert goals[2].startswith("s, 3 bits, qd ahead of qat by more than the spread: met (111.00 against 135.00, gap 24.00, spread 10.00")
    assert goals[3].startswith("s, 2 bits, qd ahead of qat by more than the spread: not met (120.00 against 124.00, gap 4.00, spread 4.00")
    assert goals[4].startswith("s, 2 bits, qd ahead of torchao qat+kd by more than the spread: not met (120.00 against 110.50, gap -9.50")
    assert len(goals) == 5  # rows that are missing (torchao at 4 bits, bucket 128) give no line
    rows = [{"student": "s", "method": m, "bits": 2, "seed": seed, "test_ppl": ppl} for m, ppls in (("qd", [118, 122]), ("qat", [123, 121])) for seed, ppl in enumerate(ppls)]
    assert accuracy.lm_goals(summary, rows)[3].endswith("; ahead in 1 of 2 seeds)")  # seed 0: 118 < 123; seed 1: 122 > 121


def test_inference_job_and_ratios(tmp_path):
    """bench/inference.py's job in-process on a small stack and a language model, and its arithmetic (the timings are not checked)."""
    inference = load("inference")
    path, lm = tmp_path / "m.safetensors", tmp_path / "lm.safetensors"
    inference.write_file(path, "stack-64-2", 4, 32, "int")
    onnx_path = inference.write_onnx(path, "stack-64-2", 0)
    rows = [inference.run_job(row, str(path), "stack-64-2", torch.get_num_threads(), 2, 1.0) for row in ("fp32 dense", "torch int4 kernel, 4 bits")]
    rows.append(inference.run_job("onnx runtime, 4 bits", str(onnx_path), "stack-64-2", torch.get_num_threads(), 2, 1.0))
    assert (rows[0]["int4"], rows[1]["int4"], rows[1]["lowbit"]) == (0, 2, 0)
    from qdistill.runtime import kernels

    assert kernels.lowbit_ready.__name__ == "lowbit_ready"  # the row's switch is undone
    reference = inference.dense_output(path, "stack-64-2")
    done = inference.with_ratios(rows, {"rss_mib": 1.0}, [reference, reference, reference])
    assert done[0]["max_rel_err"] == 0 and 0 < done[1]["max_rel_err"] < 2**-6 and done[2]["max_rel_err"] < 1e-5  # ONNX Runtime: the file's own levels
    assert done[1]["b32_speedup"] == rows[0]["b32_ms"] / rows[1]["b32_ms"] and done[1]["memory_ratio"] == (rows[0]["held_mib"] / rows[1]["held_mib"] if rows[1]["held_mib"] > 0 else None)  # in-process: freed memory may be reused
    assert done[1]["of_file"] == rows[1]["held_mib"] / (path.stat().st_size / 2**20) and done[1]["mib"] == rows[1]["rss_mib"] - 1
    assert done[1]["tensors_of_file"] == rows[1]["tensors_mib"] / (path.stat().st_size / 2**20) and done[2]["tensors_of_file"] is None  # ONNX Runtime's are not counted
    assert "| stack-64-2 | torch int4 kernel, 4 bits |" in inference.markdown(done, "setup")
    assert inference.best_of([{"b1_ms": 3.0, "b32_ms": 5.0, "held_mib": 1.0}, {"b1_ms": 2.0, "b32_ms": 6.0, "held_mib": 9.0}]) == {"b1_ms": 2.0, "b32_ms": 5.0, "held_mib": 1.0}
    inference.write_file(lm, "gpt-tiny", 4, 128, "float")
    tuned = inference.run_job("kernels, 4 bits, tuned for batch 32", str(lm), "gpt-tiny", torch.get_num_threads(), 2, 1.0)
    assert tuned["packed"] == 0 and len(tuned["output"]) == inference.VOCAB * inference.TOKENS  # every tensor runs from its codes or dense
    got, want = torch.tensor(tuned["output"]), torch.tensor(inference.dense_output(lm, "gpt-tiny"))
    assert (got - want).abs().max() <= 2**-6 * want.abs().max()


def test_embedding_goals_are_read_from_the_rows():
    """Each trained method against ptq at its own layout (qd against ptq, qd (mse) against ptq (mse)), and the
    cosine goal of each width."""
    embedding = load("embedding")

    def row(method, bits, cos, nbr10, r1, seed=0):
        return {"method": method, "bits": bits, "seed": seed, "test_cos": cos, "test_nbr10": nbr10, "test_r1": r1}

    rows = [row("teacher", 32, 1.0, 1.0, 0.50), row("ptq", 4, 0.95, 0.80, 0.50), row("ptq (mse)", 4, 0.96, 0.85, 0.50),
            row("qd", 4, 0.99, 0.92, 0.49), row("qd", 4, 0.995, 0.90, 0.495, seed=1), row("qd (mse)", 4, 0.95, 0.85, 0.50),
            row("qd", 3, 0.981, 0.8, 0.4), row("qd", 2, 0.949, 0.5, 0.3)]
    lines = embedding.goals(rows, "test")
    assert "- 4 bits, cosine: qd 0.9925 above ptq 0.9500" in lines
    assert "- 4 bits, retrieval@1: qd 0.4925 not above ptq 0.5000" in lines
    assert "- 4 bits, qd, cosine >= 0.99: met (0.9925)" in lines and "- 4 bits, qd, neighbours@10 >= 0.9: met (0.9100)" in lines
    assert any(line.startswith("- 4 bits, qd, retrieval@1 within 1 point of the teacher's (0.5000): met (0.4925, +0.8 points)") for line in lines)
    assert "- 4 bits, retrieval@1: qd (mse) 0.5000 level with ptq (mse) 0.5000" in lines  # a tie is not above
    assert "- 4 bits, cosine: qd (mse) 0.9500 not above ptq (mse) 0.9600" in lines and "- 4 bits, qd (mse), cosine >= 0.99: not met (0.9500)" in lines
    assert "- 3 bits, qd, cosine >= 0.98: met (0.9810)" in lines and "- 2 bits, qd, cosine >= 0.95: not met (0.9490)" in lines
    assert not any("3 bits, cosine: qd" in line for line in lines)  # no ptq row at 3 bits: nothing to be above


def test_every_bad_input_of_the_bench_is_handled(tmp_path):
    """bench/bad_inputs.py's cases (crafted run dirs, configs, flags, token files, packed files, tokenizers,
    Hugging Face folders, exports): each one `qdistill: error:` line, nothing run or written outside."""
    rows = load("bad_inputs").main(["--out", str(tmp_path / "bad.md")])
    assert len(rows) >= 80 and [r for r in rows if r[2] != "handled"] == []


def test_minilm_bench_plans_the_anchors_and_three_ways_to_run_each_file():
    """PyTorch fp32, ONNX Runtime fp32 and int8 dynamic, then each file on ONNX Runtime (float and int8
    activations) and on the kernels runtime; a --files label keeps its file, its ONNX made beside the ptq ones."""
    minilm = load("minilm")
    rows = minilm.plan([4], 32, ["*word_embeddings*=128"], ["qd 4b=runs/x/qd-4b.safetensors"])
    assert [r["label"] for r in rows] == [
        "PyTorch fp32", "ONNX Runtime fp32", "ONNX Runtime int8 dynamic",
        "qdistill ptq 4b, ONNX Runtime", "qdistill ptq 4b, ONNX Runtime int8 activations", "qdistill ptq 4b, kernels",
        "qdistill qd 4b, ONNX Runtime", "qdistill qd 4b, ONNX Runtime int8 activations", "qdistill qd 4b, kernels"]
    assert rows[-1]["file"] == "runs/x/qd-4b.safetensors" and rows[-3]["source_file"] == "runs/x/qd-4b.safetensors" and rows[-2]["accuracy_level"] == 4
    assert rows[3]["made"] == "ptq-4b-32-word_embeddings128.acc0.onnx" and rows[3]["bucket_by_name"] == rows[5]["bucket_by_name"] == ["*word_embeddings*=128"]
    table = minilm.markdown([{"row": r["label"], "ms_1": 2.0, "ms_32": 40.0, "cos": 0.99} for r in rows[:2]], "setup")
    assert "| ONNX Runtime fp32 | 0.9900 |" in table and "| 1.00 |" in table


def test_own_lm_runs_the_tutorial_and_resumes(tmp_path, monkeypatch):
    """bench/own_lm.py on a folder of text: the model made, the JSON lines split as its corpus was (so its
    perplexity is the same through either path), the learning rate chosen on validation, nothing redone on a rerun."""
    pytest.importorskip("datasets")
    pytest.importorskip("gguf")
    from tests.test_cli import text_folder

    monkeypatch.setenv("QDISTILL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("QDISTILL_TEXT_DIR", str(text_folder(tmp_path / "texts")))
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "bench"))
    own_lm = load("own_lm")
    args = ["--teacher-tokens", "3000", "--teacher-epochs", "1", "--train-tokens", "2000", "--val-tokens", "500", "--seq-len", "32",
            "--lrs", "1e-3", "1e-4", "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out"), "--tag", "t"]
    own_lm.main(args)
    saved = json.loads((tmp_path / "out" / "own-lm-t.json").read_text())
    teacher = json.loads((tmp_path / "work" / "teacher" / "results.json").read_text())["rows"][0]
    assert saved["rows"][0]["test_ppl"] == pytest.approx(teacher["test_ppl"], rel=1e-6)  # the same test tokens, through the model's own tokenizer
    assert set(saved["val_ppl"]) == {"ptq", "qd lr 0.001", "qd lr 0.0001"}
    chosen = min(("qd lr 0.001", "qd lr 0.0001"), key=saved["val_ppl"].get)
    assert [r["model"] for r in saved["rows"]][1:] == ["ptq 4 bits (Q4_1 layout)", f"{chosen} 4 bits (Q4_1 layout)"]
    assert all(r["gguf_bytes"] > 0 for r in saved["rows"][1:])
    logs = {p: p.stat().st_mtime_ns for p in (tmp_path / "work").glob("*/metrics.jsonl")}
    own_lm.main(args)  # a rerun (or a killed run) redoes no finished step
    assert logs == {p: p.stat().st_mtime_ns for p in (tmp_path / "work").glob("*/metrics.jsonl")}
