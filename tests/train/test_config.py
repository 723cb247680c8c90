import pytest

from qdistill import QDistillError, TrainConfig
from qdistill.train import read_yaml


@pytest.mark.parametrize(
    "change,message",
    [
        ({"method": "magic"}, "unknown method"),
        ({"bits": 9}, "bits must be an integer from 1 to 8"),
        ({"bucket": 0}, "bucket must be a positive integer"),
        ({"epochs": -1}, "epochs must be a non-negative integer"),
        ({"lr": 0}, "lr must be positive"),
        ({"temperature": 0}, "temperature must be positive"),
        ({"alpha": 1.5}, "alpha"),
        ({"batch_size": 0}, "batch_size must be a positive integer"),
        ({"schedule": "warp"}, "schedule must be one of"),
        ({"scale": "max"}, "scale must be one of minmax, mse"),
        ({"grad_clip": 0}, "grad_clip must be positive or null"),
        ({"grad_clip": "1"}, "grad_clip must be positive or null"),
        ({"grad_clip": True}, "grad_clip must be positive or null"),
        ({"scale": "mse", "method": "dq"}, "scale=mse applies to the uniform quantizer"),
        ({"scale": "mse", "method": "kd"}, "not to method kd"),
    ],
)
def test_out_of_range_values_are_named(change, message):
    with pytest.raises(QDistillError, match=message):
        TrainConfig(**change)


def test_yaml_round_trip_and_unknown_keys(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("method: qat\nbits: 3\nbucket: null\n")
    cfg = TrainConfig.from_dict(read_yaml(path))
    assert (cfg.method, cfg.bits, cfg.bucket) == ("qat", 3, None)
    with pytest.raises(QDistillError, match="unknown config keys: colour"):
        TrainConfig.from_dict({"colour": 1})
    path.write_text("guard: off\n")
    assert TrainConfig.from_dict(read_yaml(path)).guard == "off"  # YAML reads off as false
    path.write_text("bits: [1, 2")
    with pytest.raises(QDistillError, match="not valid YAML"):
        read_yaml(path)
