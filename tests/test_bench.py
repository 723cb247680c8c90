"""Smoke versions of the benchmarks: tiny sizes, a couple of steps; the numbers themselves are not checked."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).parent.parent / "bench"


def load(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_speed_student_ratios():
    speed = load("speed")
    row = speed.student_ratios("tiny", torch.device("cpu"), batch=4, steps=1)
    for key in ("qd_cached_over_fp", "dq_over_qd", "live_over_cached", "qd_mse_over_fp"):
        assert row[key] > 0


def test_speed_against_torchao():
    pytest.importorskip("torchao")
    speed = load("speed")
    row = speed.torchao_ratio(torch.device("cpu"), batch=4, steps=1)
    assert row["ours_over_torchao"] > 0


def test_accuracy_table_smoke(tmp_path):
    from qdistill.data.fashion_mnist import DEBIAN_DIR, _find

    if _find(DEBIAN_DIR) is None:
        pytest.skip("Fashion-MNIST not installed")
    from qdistill.data import load_dataset
    from qdistill.models import build_model, model_spec, save_checkpoint
    from qdistill.train import TrainConfig, train

    accuracy = load("accuracy")
    data_args = {"dataset": "fashion-mnist", "data_dir": None, "train_subset": 512, "test_subset": 256}
    data = load_dataset().subset(512, 256)
    teacher = build_model(model_spec("resnet-small"))
    train(teacher, data, TrainConfig(method="fp", epochs=1), quiet=True)
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


def test_ablation_variant_parsing():
    ablation = load("ablation")
    assert ablation.parse_variant("qd from kd, T=4: init=kd, temperature=4, scale=mse") == (
        "qd from kd, T=4",
        {"init": "kd", "temperature": 4, "scale": "mse"},
    )
    assert ablation.parse_variant("qd") == ("qd", {})
    with pytest.raises(SystemExit, match="is not key=value"):
        ablation.parse_variant("bad: epochs")


def test_ablation_smoke(tmp_path):
    from qdistill.data.fashion_mnist import DEBIAN_DIR, _find

    if _find(DEBIAN_DIR) is None:
        pytest.skip("Fashion-MNIST not installed")
    from qdistill.models import build_model, model_spec, save_checkpoint
    from qdistill.train import TrainConfig

    ablation = load("ablation")
    data_args = {"dataset": "fashion-mnist", "data_dir": None, "train_subset": 256, "test_subset": 128, "student": "tiny"}
    paths = {"teacher": str(tmp_path / "t.safetensors"), ("kd", 0): str(tmp_path / "kd0.safetensors")}
    save_checkpoint(build_model(model_spec("resnet-small")), model_spec("resnet-small"), paths["teacher"])
    base = TrainConfig(epochs=1, bits=2).to_dict()
    rows = [ablation.run_one("kd", {"method": "kd"}, 0, base, paths, data_args, threads=2)]
    for label, changes in (("qd", {}), ("mse from kd", {"init": "kd", "scale": "mse"})):
        rows.append(ablation.run_one(label, changes, 0, base, paths, data_args, threads=2))
    summary = ablation.summarize(rows, ["kd", "qd", "mse from kd"])
    assert [(r["variant"], r["bits"]) for r in summary] == [("kd", 32), ("qd", 2), ("mse from kd", 2)]
    assert summary[1]["vs_baseline"] == 0 and summary[0]["vs_baseline"] is None


def test_accuracy_rerender_merges_runs(tmp_path):
    import json

    accuracy = load("accuracy")

    def row(method, bits, seed, acc):
        return {"student": "tiny", "method": method, "bits": bits, "seed": seed, "test_acc": acc, "params": 100, "size_bytes": 400 if bits == 32 else 50}

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
