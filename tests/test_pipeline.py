import pytest

from qdistill import QDistillError, TrainConfig
from qdistill.pipeline import compare_at_bits


def test_qd_dq_without_qd_is_refused_before_any_training(tmp_path):
    with pytest.raises(QDistillError, match="ask for qd too"):
        compare_at_bits({}, None, TrainConfig(), tmp_path, None, 2, None, None, methods=("qat", "qd+dq"))
