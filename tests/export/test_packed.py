import pytest
import torch

from qdistill import LearnedPointsQuantizer, QDistillError, UniformQuantizer, attach, inspect_packed, load_packed, save_packed
from qdistill.export.huffman import mean_code_length
from qdistill.models import build_model, model_spec


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
