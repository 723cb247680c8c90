from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn

from qdistill import LearnedPointsQuantizer, QDistillError, UniformQuantizer, attach, inspect_packed, load_packed, save_packed
from qdistill.format.huffman import mean_code_length
from qdistill.format.packed import options
from qdistill.models import build_model, model_spec
from qdistill.quant import quantized_tensors


def quantized_model(preset="tiny", quantizer=None, seed=0, memory_format=torch.contiguous_format):
    torch.manual_seed(seed)
    model = build_model(model_spec(preset)).to(memory_format=memory_format)
    attach(model, quantizer or UniformQuantizer(4, 256))
    model.train()
    with torch.no_grad():  # give BatchNorm non-trivial statistics
        model(torch.randn(64, 1, 28, 28))
    return model.eval()


ROUND_TRIP = [UniformQuantizer(4, 256), UniformQuantizer(2, None), UniformQuantizer(2, 256, scale="mse"), UniformQuantizer(3, 100), LearnedPointsQuantizer(2, 64), LearnedPointsQuantizer(2, 64, n_points=5)]


@pytest.mark.parametrize("quantizer", ROUND_TRIP)
def test_round_trip_predicts_identically(tmp_path, quantizer):
    model = quantized_model(quantizer=quantizer)
    path = save_packed(model, model_spec("tiny"), tmp_path / "m.safetensors")
    loaded, meta = load_packed(path)
    x = torch.randn(32, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert {e["index_bits"] for e in meta["quantized"]} == {quantizer.index_bits}  # 5 points take 3 bits
    for qt_name in (e["name"] for e in meta["quantized"]):
        module, param = qt_name.rsplit(".", 1)
        assert torch.equal(loaded.get_submodule(module).get_parameter(param), getattr(model.get_submodule(module), param))


def test_channels_last_model_round_trip(tmp_path):
    model = quantized_model(memory_format=torch.channels_last)
    loaded = load_packed(save_packed(model, model_spec("tiny"), tmp_path / "m.safetensors"))[0]
    x = torch.randn(32, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(loaded(x), model(x), atol=1e-5)  # same weights; the layouts pick different conv kernels


def test_stochastic_rounding_model_packs_its_evaluation_weights(tmp_path):
    model = quantized_model(quantizer=UniformQuantizer(2, 256, stochastic=True)).train()  # left in training mode
    path = save_packed(model, model_spec("tiny"), tmp_path / "m.safetensors")
    loaded = load_packed(path)[0]
    x = torch.randn(16, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_4bit_file_within_2_percent_of_theory(tmp_path, preset):
    path = save_packed(quantized_model(preset), model_spec(preset), tmp_path / "m.safetensors")
    info = inspect_packed(path)
    assert info["index_bits"] == [4]
    assert 0 <= info["overhead_pct"] < 2.0
    assert info["ratio_vs_fp32"] > 5


def test_altered_file_fails_checksum(tmp_path):
    path = save_packed(quantized_model(), model_spec("tiny"), tmp_path / "m.safetensors")
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(QDistillError, match="failed its checksum"):
        load_packed(path)


def test_truncated_file(tmp_path):
    path = save_packed(quantized_model(), model_spec("tiny"), tmp_path / "m.safetensors")
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(QDistillError, match="corrupt or truncated"):
        load_packed(path)


def test_missing_file_and_existing_file_kept(tmp_path):
    with pytest.raises(QDistillError, match="does not exist"):
        load_packed(tmp_path / "none.safetensors")
    path = tmp_path / "m.safetensors"
    path.write_bytes(b"precious")
    with pytest.raises(QDistillError, match="already exists"):
        save_packed(quantized_model(), model_spec("tiny"), path)
    assert path.read_bytes() == b"precious"


def test_unquantized_model_cannot_be_packed(tmp_path):
    with pytest.raises(QDistillError, match="no quantizers"):
        save_packed(build_model(model_spec("tiny")), model_spec("tiny"), tmp_path / "m.safetensors")


def test_huffman_mean_code_length():
    assert mean_code_length([1, 1, 2, 4]) == pytest.approx((3 * 1 + 3 * 1 + 2 * 2 + 1 * 4) / 8)
    assert mean_code_length([0, 5, 0]) == 1.0
    assert mean_code_length([4, 4, 4, 4]) == 2.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("quantizer", [UniformQuantizer(2, 256), LearnedPointsQuantizer(2, 64)])
def test_round_trip_on_gpu(tmp_path, quantizer):
    model = quantized_model(quantizer=quantizer).cuda()
    path = save_packed(model, model_spec("tiny"), tmp_path / "m.safetensors")
    loaded = load_packed(path)[0].cuda()
    x = torch.randn(32, 1, 28, 28, device="cuda")
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


class TiedLM(torch.nn.Module):
    """An embedding shared with the output head, as language models tie them."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(50, 16)
        self.mix = torch.nn.Linear(16, 16)
        self.head = torch.nn.Linear(16, 50, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, x):
        return self.head(torch.relu(self.mix(self.emb(x))))


@pytest.mark.parametrize("exclude", [None, ["emb.weight"]])  # the tied tensor quantized, or kept in full precision
def test_tied_weights_are_stored_once_and_load_tied(tmp_path, exclude):
    torch.manual_seed(0)
    model = TiedLM()
    attach(model, UniformQuantizer(2, 32), exclude=exclude)
    path = save_packed(model, {"factory": "tests:TiedLM", "kwargs": {}}, tmp_path / "m.safetensors")
    loaded, meta = load_packed(path, model=TiedLM())
    assert loaded.head.weight is loaded.emb.weight
    x = torch.randint(0, 50, (4, 7))
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    stored = [e["name"] for e in meta["quantized"] + meta["kept"]]
    assert "emb.weight" in stored and "head.weight" not in stored and meta["aliases"] == {"head.weight": "emb.weight"}
    info = inspect_packed(path)
    assert info["quantized_weights"] + info["kept_values"] == sum(p.numel() for p in TiedLM().parameters())


def test_saved_files_have_the_usual_permissions(tmp_path):
    """safetensors writes 0600; a shipped model must be readable as any file its user creates."""
    import os

    from qdistill.files import current_umask
    from qdistill.models import save_checkpoint

    model = quantized_model()
    packed = save_packed(model, model_spec("tiny"), tmp_path / "m.safetensors")
    save_checkpoint(build_model(model_spec("tiny")), model_spec("tiny"), tmp_path / "c.safetensors")
    for path in (packed, tmp_path / "c.safetensors"):
        assert os.stat(path).st_mode & 0o777 == 0o666 & ~current_umask()
    assert not list(tmp_path.glob("*.tmp"))


class Mixed(torch.nn.Module):
    """Every quantized layer type: Embedding [37, 24], LSTM [80, 24] and [80, 20], Conv1d [12, 20*3], Linear [7, 12]."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(37, 24)
        self.lstm = torch.nn.LSTM(24, 20, batch_first=True)
        self.conv = torch.nn.Conv1d(20, 12, 3)
        self.head = torch.nn.Linear(12, 7)

    def forward(self, x):
        h, _ = self.lstm(self.emb(x))
        return self.head(self.conv(h.transpose(1, 2)).amax(-1))


def round_trip_mixed(tmp_path, quantizer):
    torch.manual_seed(0)
    model = Mixed()
    attach(model, quantizer)
    path = save_packed(model.eval(), {"factory": "tests.format.test_packed:Mixed", "kwargs": {}}, tmp_path / "m.safetensors")
    loaded, meta = load_packed(path, model=Mixed())
    for e in meta["quantized"]:
        module, param = e["name"].rsplit(".", 1)
        assert torch.equal(loaded.get_submodule(module).get_parameter(param), getattr(model.get_submodule(module), param)), e["name"]
    x = torch.randint(0, 37, (3, 9))
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    return path, meta


KERNEL_OPTIONS = [
    {"groups": g, "zero_point": z, "scale_dtype": d}
    for g in ("flat", "row") for z in ("float", "int") for d in ("float32", "float16", "bfloat16")
]  # fmt: skip


@pytest.mark.parametrize("bucket", [None, 16])  # 16 divides none of the rows (24, 20, 60, 12 values): padded groups
@pytest.mark.parametrize("scale", ["minmax", "mse"])
@pytest.mark.parametrize("opts", KERNEL_OPTIONS, ids=lambda o: "-".join(o.values()))
def test_kernel_ready_options_reload_bit_exactly(tmp_path, opts, scale, bucket):
    path, meta = round_trip_mixed(tmp_path, UniformQuantizer(3, bucket, scale=scale, **opts))
    assert all(options(e) == opts for e in meta["quantized"])  # the defaults are left out of the file
    with safe_open(str(path), "pt") as f:
        blob = {"float32": "scales", "float16": "scales.float16", "bfloat16": "scales.bfloat16"}[opts["scale_dtype"]]
        assert f.get_tensor(blob).dtype == getattr(torch, opts["scale_dtype"])
        assert ("zero_points" in f.keys()) == (opts["zero_point"] == "int")


@pytest.mark.parametrize("bucket", [None, 16])
@pytest.mark.parametrize("groups", ["flat", "row"])
@pytest.mark.parametrize("scale_dtype", ["float32", "float16", "bfloat16"])
def test_learned_points_with_row_groups_and_16_bit_scales_reload_bit_exactly(tmp_path, groups, scale_dtype, bucket):
    round_trip_mixed(tmp_path, LearnedPointsQuantizer(2, bucket, groups=groups, scale_dtype=scale_dtype, n_points=3))


V1_FILES = {"v1-uniform-3b": lambda: UniformQuantizer(3, 100), "v1-learned-2b": lambda: LearnedPointsQuantizer(2, 64)}


@pytest.mark.parametrize("name", V1_FILES)
def test_files_of_the_version_before_the_options_load_and_defaults_are_written_as_they_were(tmp_path, name):
    """tests/format/data holds files that the writer before the kernel-ready options (commit 2cdb80f) made of
    `quantized_model`: they load, and a model with the default options is written byte for byte as then
    (version 1, readable by that version)."""
    old = Path(__file__).parent / "data" / f"{name}.safetensors"
    model = quantized_model(quantizer=V1_FILES[name]())
    loaded, meta = load_packed(old)
    assert meta["version"] == 1
    x = torch.randn(8, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert save_packed(model, model_spec("tiny"), tmp_path / "new.safetensors").read_bytes() == old.read_bytes()


def test_a_file_with_options_is_version_2(tmp_path):
    from qdistill.format.packed import read_packed

    meta, _ = read_packed(save_packed(quantized_model(quantizer=UniformQuantizer(3, 100, groups="row")), model_spec("tiny"), tmp_path / "m.safetensors"))
    assert meta["version"] == 2 and {e["groups"] for e in meta["quantized"]} == {"row"} and "zero_point" not in meta["quantized"][0]


@pytest.mark.parametrize(
    "opts,group_bits",
    [({}, 64), ({"groups": "row"}, 64), ({"scale_dtype": "float16"}, 32), ({"scale_dtype": "bfloat16", "zero_point": "int"}, 24), ({"zero_point": "int"}, 40)],
)
def test_inspect_counts_the_stored_scales_at_their_own_size(tmp_path, opts, group_bits):
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 96))  # rows of 64 and 32: 32-value groups tile them
    attach(model, UniformQuantizer(4, 32, **opts))
    path = save_packed(model, {"factory": "torch.nn:Linear", "kwargs": {}}, tmp_path / "m.safetensors")
    info = inspect_packed(path)
    weights, groups = 64 * 32 + 32 * 96, (64 * 32 + 32 * 96) // 32
    assert info["nominal_ratio_quantized"] == pytest.approx(32 * weights / (4 * weights + group_bits * groups))
    assert 0 <= info["disk_bytes"] - info["theoretical_bytes"] < 400  # the safetensors header's tensor table
    with safe_open(str(path), "pt") as f:
        side = sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys() if k.startswith(("scales", "zero_points")))
    assert side == group_bits * groups // 8
    assert info["kernel_ready_tensors"] == 2 and info["scale_dtypes"] == [opts.get("scale_dtype", "float32")]


@pytest.mark.parametrize("quantizer", [UniformQuantizer(4, 32), LearnedPointsQuantizer(4, 32), LearnedPointsQuantizer(3, 32, n_points=5)])
def test_inspect_nominal_ratio_counts_what_size_bits_counts(tmp_path, quantizer):
    """A learned codebook is stored (float32 points): the nominal ratio counts it, as `Quantizer.size_bits` does."""
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 96))
    attach(model, quantizer)
    info = inspect_packed(save_packed(model, {"factory": "torch.nn:Linear", "kwargs": {}}, tmp_path / "m.safetensors"))
    qts = quantized_tensors(model)
    bits = sum(qt.quantizer.size_bits(qt.shadow.shape) for qt in qts)
    assert info["nominal_ratio_quantized"] == pytest.approx(32 * sum(qt.shadow.numel() for qt in qts) / bits, rel=1e-12)


def test_huffman_size_counts_its_code_table(tmp_path):
    """Indices spread evenly over 16 levels: Huffman coding saves nothing, and its table (16 code lengths of 8 bits) costs 16 bytes."""
    model = nn.Sequential(nn.Linear(64, 32))
    with torch.no_grad():
        model[0].weight.copy_(torch.arange(16.0).repeat(32, 4))  # each group of 32 holds every level twice
    attach(model, UniformQuantizer(4, 32))
    path = save_packed(model, {"factory": "torch.nn:Linear", "kwargs": {}}, tmp_path / "m.safetensors")
    info = inspect_packed(path)
    with safe_open(str(path), "pt") as f:
        rest = sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys() if k != "indices")  # scales, the bias
    assert info["huffman_bits_per_weight"] == 4.0
    assert info["huffman_bytes"] == 64 * 32 * 4 // 8 + 16 + rest


def test_inspect_tells_padded_row_groups_from_kernel_ready_ones(tmp_path):
    model = nn.Sequential(nn.Linear(64, 8), nn.Linear(8, 60), nn.Linear(60, 4))  # rows of 64 (2 groups), 8 (one), 60 (padded)
    attach(model, UniformQuantizer(4, 32, groups="row", scale_dtype="bfloat16"))
    info = inspect_packed(save_packed(model, {}, tmp_path / "m.safetensors"))
    assert info["kernel_ready_tensors"] == 2 and info["groups"] == ["row"]


@pytest.mark.parametrize("quantizer", [UniformQuantizer(3, 32), UniformQuantizer(3, 32, scale_dtype="bfloat16"), UniformQuantizer(3, 32, zero_point="int"), LearnedPointsQuantizer(2, 32)])
def test_group_step_is_the_distance_between_adjacent_levels(tmp_path, quantizer):
    """`group_step`: level q of a group is lo + q * step (uniform), lo + point * step (learned points in [0, 1]),
    or (q - zero) * step, within float rounding of the decoded weights."""
    from qdistill.format.packed import decode_entry, entry_indices, entry_params, group_step, read_packed

    model = nn.Sequential(nn.Linear(64, 8))
    attach(model, quantizer)
    meta, tensors = read_packed(save_packed(model, {}, tmp_path / "m.safetensors"))
    entry = meta["quantized"][0]
    p = entry_params(entry, tensors)
    step = group_step(entry, p)
    if "step" in p:
        assert step is p["step"]
    levels = entry_indices(entry, tensors).view(-1, 32).float()
    if entry["kind"] == "learned":
        levels = tensors["points"][levels.long()]
    want = (levels - p["zero"][:, None]) * step[:, None] if "zero" in p else p["lo"][:, None] + levels * step[:, None]
    assert torch.allclose(want.view(8, 64), decode_entry(entry, tensors), rtol=0, atol=1e-6)
