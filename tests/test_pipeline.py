import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from qdistill import QDistillError, TrainConfig
from qdistill.pipeline import low_bit_steps, reference_steps


def test_qd_dq_without_qd_is_refused_before_any_training():
    with pytest.raises(QDistillError, match="ask for qd too"):
        low_bit_steps(TrainConfig(), 2, methods=("qat", "qd+dq"))


def test_fp_and_kd_of_a_clipped_range_run_leave_the_quantizer_setting_out():
    """`qdistill demo --scale mse` builds fp and kd from the same base: they must not be refused for a quantizer setting."""
    base = TrainConfig(method="qd", bits=2, scale="mse", epochs=3)
    steps = reference_steps(base)
    assert [(label, cfg.method, cfg.scale, cfg.epochs) for label, cfg, _ in steps] == [("fp", "fp", "minmax", 3), ("kd", "kd", "minmax", 3)]
    assert {cfg.scale for _, cfg, _ in low_bit_steps(base, 2, ("ptq", "qat", "qd"))} == {"mse"}


def test_every_low_bit_step_is_built_with_options_learned_points_lack():
    """dq and qd+dq leave out --scale mse and --zero-point int (refused for learned points) instead of
    failing after fp and kd have trained; the uniform methods keep them."""
    steps = {label: cfg for label, cfg, _ in low_bit_steps(TrainConfig(method="qd", zero_point="int", scale="mse"), 2)}
    assert (steps["qd"].zero_point, steps["qd"].scale) == ("int", "mse")
    assert {(steps[m].zero_point, steps[m].scale) for m in ("dq", "qd+dq")} == {("float", "minmax")}


def test_teacher_cache_ignores_settings_that_do_not_change_the_teacher(monkeypatch):
    from qdistill import pipeline
    from tests.conftest import toy_dataset

    calls = []
    real_train = pipeline.train
    monkeypatch.setattr(pipeline, "train", lambda *a, **k: calls.append(1) or real_train(*a, **k))
    data = toy_dataset(n_train=64, n_test=32)
    for layout in ("contiguous", "channels_last"):
        pipeline.get_teacher(data, "tiny", TrainConfig(method="fp", epochs=1, memory_format=layout))
    pipeline.get_teacher(data, "tiny", TrainConfig(method="qd", epochs=1, bits=2, dq_epochs=3, temperature=1.0, scale="mse"))
    assert len(calls) == 1
    pipeline.get_teacher(data, "tiny", TrainConfig(method="fp", epochs=2))
    assert len(calls) == 2
    pipeline.get_teacher(data, "tiny", TrainConfig(method="fp", epochs=2, grad_clip=1.0))
    assert len(calls) == 3


def test_a_shipped_teacher_is_used_when_it_is_the_teacher_asked_for(monkeypatch, tmp_path):
    from qdistill import pipeline
    from qdistill.models import model_spec, save_checkpoint
    from tests.conftest import toy_dataset

    data = toy_dataset(n_train=64, n_test=32)
    cfg = TrainConfig(method="fp", epochs=1)
    shipped = tmp_path / "shipped"
    monkeypatch.setattr(pipeline, "SHIPPED_TEACHERS", shipped)
    monkeypatch.setattr(pipeline, "train", lambda *a, **k: pytest.fail("trained a teacher that was shipped"))
    marker = pipeline.build_model(model_spec("tiny", 1, 4))
    torch.nn.init.constant_(marker.classifier[2].bias, 7.0)
    save_checkpoint(marker, model_spec("tiny", 1, 4), shipped / pipeline.teacher_file_name(data, "tiny", cfg))
    teacher = pipeline.get_teacher(data, "tiny", cfg.replace(bits=2, method="qd"))  # same fp settings
    assert torch.equal(teacher.classifier[2].bias, torch.full((4,), 7.0))
    with pytest.raises(pytest.fail.Exception):  # other settings: not the shipped teacher, so it trains
        pipeline.get_teacher(data, "tiny", cfg.replace(epochs=2))


@pytest.mark.usefixtures("fashion_mnist")
def test_the_demo_finds_the_shipped_teacher():
    """Adding an option must not change the demo teacher's key, or `make demo` trains its teacher again."""
    from qdistill.data import load_dataset
    from qdistill.pipeline import SHIPPED_TEACHERS, teacher_file_name

    name = teacher_file_name(load_dataset("fashion-mnist"), "resnet-small", TrainConfig(method="fp", epochs=3))
    assert (SHIPPED_TEACHERS / name).exists(), name


PARENT = """
import os, sys, time
from qdistill.pipeline import worker_pool

def job(path):
    with open(path, "w") as f:
        f.write(str(os.getpid()))
    time.sleep(300)

if __name__ == "__main__":
    with worker_pool(1) as pool:
        pool.submit(job, sys.argv[1])
        time.sleep(300)
"""


def running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return not any(line.startswith("State:") and "Z" in line for line in f)  # a zombie has ended
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads /proc")
def test_workers_end_when_their_parent_is_killed(tmp_path):
    """A run killed with SIGKILL (no handler runs) leaves no worker computing a job nobody will read."""
    script, pid_file = tmp_path / "parent.py", tmp_path / "worker.pid"
    script.write_text(PARENT)
    parent = subprocess.Popen([sys.executable, str(script), str(pid_file)])
    try:
        deadline = time.monotonic() + 120
        while not (pid_file.exists() and pid_file.read_text()) and time.monotonic() < deadline:
            time.sleep(0.2)
        worker = int(pid_file.read_text())
        assert running(worker)
    finally:
        parent.kill()
        parent.wait()
    deadline = time.monotonic() + 20
    while running(worker) and time.monotonic() < deadline:
        time.sleep(0.2)
    if running(worker):
        os.kill(worker, signal.SIGKILL)
        pytest.fail("the worker outlived its killed parent")


def test_a_packed_file_that_does_not_hold_the_trained_weights_is_caught(tmp_path, monkeypatch):
    """The row reports the trained model's metrics because the file holds its quantized weights bit for bit."""
    from qdistill import pipeline
    from qdistill.models import model_spec
    from qdistill.runtime import load_packed
    from tests.conftest import toy_dataset

    data = toy_dataset(n_train=128, n_test=64)
    spec = model_spec("tiny", in_channels=1, num_classes=4)
    cfg = TrainConfig(method="qat", bits=4, epochs=1, batch_size=64)
    row, _ = pipeline.run_method("qat", spec, data, cfg, tmp_path)
    assert row["file"] == "qat-4b.safetensors"

    def one_weight_off(path, model):
        model, meta = load_packed(path, model=model)
        next(model.parameters()).data.view(-1)[0] += 1e-3
        return model, meta

    monkeypatch.setattr(pipeline, "load_packed", one_weight_off)
    (tmp_path / "again").mkdir()
    with pytest.raises(RuntimeError, match="differ from the trained quantized model"):
        pipeline.run_method("qat", spec, data, cfg, tmp_path / "again")
