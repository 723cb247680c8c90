import pytest

from qdistill import QDistillError, TrainConfig
from qdistill.pipeline import low_bit_steps


def test_qd_dq_without_qd_is_refused_before_any_training():
    with pytest.raises(QDistillError, match="ask for qd too"):
        low_bit_steps(TrainConfig(), 2, methods=("qat", "qd+dq"))


def test_teacher_cache_ignores_settings_that_do_not_change_the_teacher(monkeypatch):
    from qdistill import pipeline
    from tests.conftest import toy_dataset

    calls = []
    real_train = pipeline.train
    monkeypatch.setattr(pipeline, "train", lambda *a, **k: calls.append(1) or real_train(*a, **k))
    data = toy_dataset(n_train=64, n_test=32)
    for layout in ("contiguous", "channels_last"):
        pipeline.get_teacher(data, "tiny", TrainConfig(method="fp", epochs=1, memory_format=layout), quiet=True)
    pipeline.get_teacher(data, "tiny", TrainConfig(method="qd", epochs=1, bits=2, dq_epochs=3, temperature=1.0, scale="mse"), quiet=True)
    assert len(calls) == 1
    pipeline.get_teacher(data, "tiny", TrainConfig(method="fp", epochs=2), quiet=True)
    assert len(calls) == 2
    pipeline.get_teacher(data, "tiny", TrainConfig(method="fp", epochs=2, grad_clip=1.0), quiet=True)
    assert len(calls) == 3
