"""Export to ONNX: row-grouped Linear weights become ONNX Runtime MatMulNBits nodes holding the file's levels,
and ONNX Runtime computes what the packed model computes."""

import json

import onnx
import pytest
import torch
from torch import nn

import qdistill
from qdistill.cli import main
from qdistill.export.onnx import check_with_onnxruntime, export_onnx, pack_rows
from qdistill.models import STUDENT_PRESETS, TEACHER_PRESETS, build_model, model_spec
from qdistill.quant import attach

SPEC = {"factory": "torch.nn:Identity", "kwargs": {}}  # the architecture is passed in: the file's spec is not used


def mlp():
    return nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 32))


def packed_mlp(tmp_path, **options):
    torch.manual_seed(0)
    model = mlp()
    attach(model, qdistill.UniformQuantizer(**options))
    return qdistill.save_packed(model, SPEC, tmp_path / "m.safetensors")


def ops(path):
    return [n.op_type for n in onnx.load(str(path)).graph.node]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("zero_point", ["int", "float"])
def test_ort_computes_the_packed_model(tmp_path, bits, zero_point):
    path = packed_mlp(tmp_path, bits=bits, bucket=32, groups="row", zero_point=zero_point, scale_dtype="float16")
    x = torch.randn(5, 64)
    info = export_onnx(path, tmp_path / "m.onnx", (torch.zeros(1, 64),), model=mlp(), dynamic={"x": {0: "batch"}})
    low_bit = 0 if (bits, zero_point) == (8, "float") else 2  # ONNX Runtime's CPU kernel has no 8-bit float zero points
    assert info["matmul_nbits"] == low_bit and info["float32"] == 2 - low_bit and ops(tmp_path / "m.onnx").count("MatMulNBits") == low_bit
    expected = qdistill.load_packed(path, model=mlp())[0](x).detach()
    got = check_with_onnxruntime(tmp_path / "m.onnx", (x,))
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()
    dense_bytes = 4 * (64 * 96 + 96 * 32)
    if low_bit:
        assert info["bytes"] < dense_bytes * (bits if bits != 3 else 4) / 32 + 8000  # the weights are stored low-bit


def test_groups_that_straddle_rows_stay_float32(tmp_path):
    path = packed_mlp(tmp_path, bits=4, bucket=256)  # flat buckets of 256 across rows of 64 and 96 inputs
    x = torch.randn(3, 64)
    info = export_onnx(path, tmp_path / "m.onnx", (x,), model=mlp())
    assert info["matmul_nbits"] == 0 and info["float32"] == 2 and "MatMulNBits" not in ops(tmp_path / "m.onnx")
    expected = qdistill.load_packed(path, model=mlp())[0](x).detach()
    torch.testing.assert_close(check_with_onnxruntime(tmp_path / "m.onnx", (x,)), expected, rtol=1e-5, atol=1e-6)


def test_pack_rows_puts_the_first_value_in_the_lowest_bits():
    assert pack_rows(torch.tensor([[1, 2, 3, 0]]), 2).tolist() == [[1 | 2 << 2 | 3 << 4]]
    assert pack_rows(torch.tensor([[5, 10, 15]]), 4).tolist() == [[5 | 10 << 4, 15]]  # a row padded to whole bytes


def test_command_line_export_checks_itself_and_never_overwrites(tmp_path, capsys):
    run = tmp_path / "r"
    data = ["--dataset", "tests.conftest:toy_dataset", "--train-subset", "64", "--test-subset", "32", "--quiet"]
    assert main(["distill", "--method", "qat", "--student", "tests.conftest:toy_mlp", "--epochs", "1", "--bucket", "16", "--groups", "row",
                 "--zero-point", "int", *data, "--run-dir", str(run)]) == 0
    packed = run / json.loads((run / "results.json").read_text())["rows"][0]["file"]
    capsys.readouterr()
    onnx_file = tmp_path / "m.onnx"
    argv = ["export", str(packed), str(onnx_file), "--format", "onnx", "--model", "tests.conftest:toy_mlp", "--image-size", "8"]
    assert main(argv) == 0
    said = " ".join(capsys.readouterr().out.split())
    assert "2 weights as MatMulNBits, 0 tables as GatherBlockQuantized, 0 in float32" in said and "within" in said
    images = torch.randn(4, 1, 8, 8)
    expected = qdistill.load_packed(packed, model=__import__("tests.conftest", fromlist=["toy_mlp"]).toy_mlp())[0](images).detach()
    assert torch.equal(check_with_onnxruntime(onnx_file, (images,), ("images",)).argmax(-1), expected.argmax(-1))
    before = onnx_file.read_bytes()
    assert main(argv) == 2 and "exists" in capsys.readouterr().err and onnx_file.read_bytes() == before
    assert main([*argv, "--overwrite", "--accuracy-level", "7"]) == 2 and "accuracy_level must be 0 to 4" in capsys.readouterr().err
    assert onnx_file.read_bytes() == before


@pytest.mark.parametrize("preset", [*STUDENT_PRESETS, *TEACHER_PRESETS])
def test_every_conv_preset_exports_at_the_default_image_size(tmp_path, capsys, preset):
    """A conv student pools 7x7 features to 3x3 at 28 pixels, which torch.onnx's own adaptive pooling refuses."""
    torch.manual_seed(0)
    spec = model_spec(preset)
    model = build_model(spec)
    attach(model, qdistill.UniformQuantizer(bits=4, bucket=16, groups="row"))
    packed = qdistill.save_packed(model, spec, tmp_path / "m.safetensors")
    assert main(["export", str(packed), str(tmp_path / "m.onnx"), "--format", "onnx"]) == 0, capsys.readouterr().err
    images = torch.randn(3, 1, 28, 28)
    expected = qdistill.load_packed(packed)[0](images).detach()
    torch.testing.assert_close(check_with_onnxruntime(tmp_path / "m.onnx", (images,), ("images",)), expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


@pytest.mark.parametrize("pool, pooled", [(nn.AdaptiveMaxPool2d(3), 9), (nn.AdaptiveAvgPool2d((3, 2)), 6), (nn.AdaptiveMaxPool2d((None, 4)), 28), (nn.AdaptiveAvgPool2d(1), 1)])
def test_adaptive_pooling_of_any_output_size_exports_exactly(tmp_path, pool, pooled):
    def net():  # 7x9 features from 9x11 images
        return nn.Sequential(nn.Conv2d(2, 4, 3), pool, nn.Flatten(), nn.Linear(4 * pooled, 5))

    torch.manual_seed(0)
    model = net()
    attach(model, qdistill.UniformQuantizer(bits=4))
    path = qdistill.save_packed(model, SPEC, tmp_path / "m.safetensors")
    x = torch.randn(3, 2, 9, 11)
    export_onnx(path, tmp_path / "m.onnx", (torch.zeros(1, 2, 9, 11),), model=net(), dynamic={"x": {0: "batch"}})
    expected = qdistill.load_packed(path, model=net())[0](x).detach()
    torch.testing.assert_close(check_with_onnxruntime(tmp_path / "m.onnx", (x,)), expected, rtol=1e-5, atol=1e-6)


class Bag(nn.Module):
    """Token embeddings (and a tied or untied output layer): what an encoder's or LM's tables look like."""

    def __init__(self, tied=False):
        super().__init__()
        self.emb = nn.Embedding(200, 64)
        self.out = nn.Linear(64, 200, bias=False)
        if tied:
            self.out.weight = self.emb.weight

    def forward(self, ids):
        return self.out(torch.tanh(self.emb(ids)))


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
def test_embeddings_become_gather_block_quantized_and_compute_the_packed_model(tmp_path, bits):
    """The table of a MiniLM is half its weights: kept low-bit in the graph, looked up exactly."""
    torch.manual_seed(0)
    model = Bag()
    attach(model, qdistill.UniformQuantizer(bits=bits, bucket=32, groups="row", zero_point="int"))
    path = qdistill.save_packed(model, SPEC, tmp_path / "m.safetensors")
    ids = torch.randint(0, 200, (3, 7))
    info = export_onnx(path, tmp_path / "m.onnx", (ids,), input_names=("ids",), model=Bag(), dynamic={"ids": {0: "batch", 1: "length"}})
    assert (info["gather_block_quantized"], info["matmul_nbits"], info["float32"]) == (1, 1, 0) and "GatherBlockQuantized" in ops(tmp_path / "m.onnx")
    expected = qdistill.load_packed(path, model=Bag())[0](ids).detach()
    torch.testing.assert_close(check_with_onnxruntime(tmp_path / "m.onnx", (ids,), ("ids",)), expected, rtol=1e-5, atol=1e-6)
    assert info["bytes"] < 4 * 200 * 64 * (4 if bits <= 4 else 8) / 32 * 2 + 12000  # both tables low-bit


def test_a_table_in_bigger_groups_than_the_layers_exports_exactly(tmp_path):
    """bucket_by_name: the table in row groups of 64, the output layer in groups of 16, each op with its own block size."""
    torch.manual_seed(0)
    model = Bag()
    cfg = qdistill.TrainConfig(method="qd", bits=4, bucket=16, groups="row", zero_point="int", bucket_by_name=["emb.*=64"])
    attach(model, cfg.make_quantizer("uniform"), by_name=cfg.quantizers_by_name("uniform"))
    path = qdistill.save_packed(model, SPEC, tmp_path / "m.safetensors")
    ids = torch.randint(0, 200, (3, 7))
    info = export_onnx(path, tmp_path / "m.onnx", (ids,), input_names=("ids",), model=Bag(), dynamic={"ids": {0: "batch", 1: "length"}})
    graph = onnx.load(str(tmp_path / "m.onnx")).graph
    blocks = {n.op_type: next(a.i for a in n.attribute if a.name == "block_size") for n in graph.node if n.op_type in ("GatherBlockQuantized", "MatMulNBits")}
    assert blocks == {"GatherBlockQuantized": 64, "MatMulNBits": 16} and info["float32"] == 0
    expected = qdistill.load_packed(path, model=Bag())[0](ids).detach()
    torch.testing.assert_close(check_with_onnxruntime(tmp_path / "m.onnx", (ids,), ("ids",)), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", ["float zero points", "tied to the output layer"])
def test_tables_the_op_cannot_hold_stay_float32_and_exact(tmp_path, case):
    torch.manual_seed(0)
    model = Bag(tied=case == "tied to the output layer")
    attach(model, qdistill.UniformQuantizer(bits=4, bucket=32, groups="row", zero_point="float" if case == "float zero points" else "int"))
    path = qdistill.save_packed(model, SPEC, tmp_path / "m.safetensors")
    ids = torch.randint(0, 200, (2, 5))
    fresh = Bag(tied=case == "tied to the output layer")
    info = export_onnx(path, tmp_path / "m.onnx", (ids,), input_names=("ids",), model=fresh)
    assert info["gather_block_quantized"] == 0 and "GatherBlockQuantized" not in ops(tmp_path / "m.onnx")
    expected = qdistill.load_packed(path, model=Bag(tied=case == "tied to the output layer"))[0](ids).detach()
    torch.testing.assert_close(check_with_onnxruntime(tmp_path / "m.onnx", (ids,), ("ids",)), expected, rtol=1e-5, atol=1e-6)
