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
        ({"grad_clip": "1"}, "grad_clip must be a finite number or null"),
        ({"grad_clip": True}, "grad_clip must be a finite number or null"),
        ({"scale": "mse", "method": "dq"}, "scale=mse applies to the uniform quantizer"),
        ({"scale": "mse", "method": "kd"}, "not to method kd"),
        ({"dropout": 1.0}, "dropout must be a probability"),
        ({"hidden_states": -1.0}, "hidden_states must be a non-negative weight"),
        ({"bucket_by_name": ["*emb*"]}, "bucket_by_name takes GLOB=N"),
        ({"bucket_by_name": ["*emb*=0"]}, "bucket_by_name takes GLOB=N"),
        ({"bucket_by_name": ["=64"]}, "bucket_by_name takes GLOB=N"),
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


@pytest.mark.parametrize(
    "change,message",
    [
        ({"groups": "column"}, "groups must be one of flat, row"),
        ({"zero_point": "uint8"}, "zero_point must be one of float, int"),
        ({"scale_dtype": "fp16"}, "scale_dtype must be one of float32, float16, bfloat16"),
        ({"zero_point": "int", "method": "dq"}, "zero_point=int applies to the uniform quantizer.*use zero_point float"),
        ({"zero_point": "int", "method": "qd+dq"}, "not to method qd\\+dq"),
    ],
)
def test_kernel_ready_options_are_checked(change, message):
    with pytest.raises(QDistillError, match=message):
        TrainConfig(**change)


def test_kernel_ready_options_reach_the_quantizers(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("method: qd+dq\ngroups: row\nscale_dtype: bfloat16\nbucket: 32\n")
    cfg = TrainConfig.from_dict(read_yaml(path))
    uniform, learned = cfg.make_quantizer("uniform"), cfg.make_quantizer("learned")
    assert (uniform.groups, uniform.zero_point, uniform.scale_dtype, uniform.bucket) == ("row", "float", "bfloat16", 32)
    assert (learned.groups, learned.scale_dtype) == ("row", "bfloat16")
    q = TrainConfig(method="qat", zero_point="int", scale_dtype="float16").make_quantizer("uniform")
    assert (q.zero_point, q.scale_dtype, q.form) == ("int", "float16", "int-zero")
    assert TrainConfig().make_quantizer("uniform").form == "range"  # the paper's, by default


def test_buckets_by_name_reach_the_quantizers_of_those_tensors():
    from qdistill import attach

    from tests.quant.test_attach import Mixed

    cfg = TrainConfig(method="qd", bucket=16, bucket_by_name=["emb.*=64", "*=8", "head.*=32"])
    sizes = {qt.name: qt.quantizer.bucket for qt in attach(Mixed(), cfg.make_quantizer("uniform"), by_name=cfg.quantizers_by_name("uniform"))}
    assert sizes == {"emb.weight": 64, "rnn.weight_ih_l0": 8, "rnn.weight_hh_l0": 8, "conv.weight": 8, "head.weight": 8}  # the first match wins
    only = TrainConfig(bucket=16, bucket_by_name=["head.*=32"])
    sizes = {qt.name: qt.quantizer.bucket for qt in attach(Mixed(), only.make_quantizer("learned"), by_name=only.quantizers_by_name("learned"))}
    assert sizes["head.weight"] == 32 and sizes["conv.weight"] == 16
    typo = TrainConfig(bucket_by_name=["*word_embedding=128"])
    with pytest.raises(QDistillError, match="no quantized tensor is named like '\\*word_embedding'"):
        attach(Mixed(), typo.make_quantizer("uniform"), by_name=typo.quantizers_by_name("uniform"))
    with pytest.raises(QDistillError, match="names 'emb.\\*' twice"):
        TrainConfig(bucket_by_name=["emb.*=64", "emb.*=8"])
