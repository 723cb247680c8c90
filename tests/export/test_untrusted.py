"""Opening a file never runs code it names, and damaged or crafted files fail with one QDistillError."""

import json
import math
import re
import signal
from contextlib import contextmanager

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.nn.modules.module import register_module_parameter_registration_hook

from qdistill import QDistillError, UniformQuantizer, attach, load_packed, save_packed
from qdistill.cli import main
from qdistill.models import build_model, load_checkpoint, model_spec, save_checkpoint
from tests.crafted import floats_into_uint8_blob, rewrite
from tests.format.test_packed import quantized_model


class Hung(BaseException):
    """Not an Exception, so that no `except Exception` in the code under test makes it a QDistillError."""


@contextmanager
def deadline(seconds):
    """Raises Hung in the main thread once `seconds` have passed (pytest-timeout may not be installed)."""

    def hang(*_):
        raise Hung(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, hang)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class BuiltForReal(BaseException):
    """A parameter registered off the meta device while a test watches."""


@contextmanager
def nothing_built_for_real():
    """Raises BuiltForReal when a module registers a parameter off the meta device: before its values are
    written, so a test of a huge crafted model fails without filling gigabytes."""

    def refuse(module, name, param):
        if param is not None and param.device.type != "meta":
            raise BuiltForReal(f"{type(module).__name__}.{name} of {param.numel():,} values was built for real")

    hook = register_module_parameter_registration_hook(refuse)
    try:
        yield
    finally:
        hook.remove()


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    path = tmp_path_factory.mktemp("packed") / "m.safetensors"
    return save_packed(quantized_model(quantizer=UniformQuantizer(3, 100)), model_spec("tiny"), path)


def evil_spec(marker):
    return {"factory": "os:system", "kwargs": {"command": f"touch {marker}"}}


def test_packed_file_naming_code_does_not_run_it(packed, tmp_path, capsys):
    marker = tmp_path / "pwned"
    evil = rewrite(packed, tmp_path / "evil.safetensors", lambda m: m.update(spec=evil_spec(marker)))
    with pytest.raises(QDistillError, match="os:system.*--trust-code"):
        load_packed(evil)
    assert main(["eval", str(evil)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("qdistill: error:") and err.count("\n") == 1 and "--model" in err
    assert not marker.exists()


def test_checkpoint_naming_code_does_not_run_it(tmp_path, capsys):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.safetensors"
    save_checkpoint(nn.Linear(2, 2), evil_spec(marker), path)
    with pytest.raises(QDistillError, match="os:system"):
        load_checkpoint(path)
    assert main(["distill", "--method", "kd", "--teacher", str(path), "--run-dir", str(tmp_path / "r"), "--dataset", "tests.export.test_untrusted:never_loaded"]) == 2
    assert not marker.exists()


OUTGROWN = "its spec describes a model of [0-9,]+ values but its weights hold [0-9,]+: a damaged or crafted file \\(nothing was built\\)"


def test_a_checkpoint_whose_spec_outgrows_its_weights_is_refused_before_building(tmp_path):
    """A small file's spec names a preset far larger than its tensors: refused from a build on the meta device."""
    path = tmp_path / "m.safetensors"
    save_checkpoint(build_model(model_spec("tiny")), model_spec("lstm-teacher", num_classes=8192), path)  # 8.4M values for 25k
    with nothing_built_for_real(), pytest.raises(QDistillError, match=f"{re.escape(str(path))}: {OUTGROWN}"):
        load_checkpoint(path)


def test_a_packed_file_whose_spec_outgrows_its_weights_is_refused_before_building(packed, tmp_path, capsys):
    evil = rewrite(packed, tmp_path / "evil.safetensors", lambda m: m.update(spec=model_spec("lstm-teacher", num_classes=8192)))
    with nothing_built_for_real(), pytest.raises(QDistillError, match=OUTGROWN):
        load_packed(evil)
    assert main(["eval", str(evil)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("qdistill: error:") and err.count("\n") == 1 and "nothing was built" in err


@pytest.mark.parametrize("preset", ["small", "resnet-small", "lstm-tiny", "gpt-tiny"])
def test_presets_from_their_own_files_still_load(tmp_path, preset):
    """The bound on a file's spec leaves every preset room, tied weights stored once and buffers included."""
    spec = model_spec(preset, num_classes=97)
    model = build_model(spec)
    save_checkpoint(model, spec, tmp_path / "m.safetensors")
    loaded = load_checkpoint(tmp_path / "m.safetensors")[0]
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))


def never_loaded():  # the distill above must fail on the teacher before any data is read... or on the data, not by running code
    raise QDistillError("data hook called")


def test_the_callers_own_model_or_trust_code_loads_a_custom_architecture(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    attach(model, UniformQuantizer(4, 32))
    spec = {"factory": "torch.nn:Linear", "kwargs": {"in_features": 8, "out_features": 3}}  # deliberately not the model's
    path = save_packed(model, spec, tmp_path / "m.safetensors")
    with pytest.raises(QDistillError, match="torch.nn:Linear"):
        load_packed(path)
    own = load_packed(path, model=nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)))[0]
    x = torch.randn(4, 8)
    with torch.no_grad():
        assert torch.equal(own(x), model(x))
    with pytest.raises(QDistillError, match="do not fit"):  # trusted, it runs the named factory, whose shapes differ
        load_packed(path, trust_code=True)


def test_top_level_parametrized_weight_round_trips(tmp_path):
    model = nn.Linear(40, 6)
    attach(model, UniformQuantizer(2, 16))
    path = save_packed(model, {"factory": "torch.nn:Linear", "kwargs": {"in_features": 40, "out_features": 6}}, tmp_path / "m.safetensors")
    loaded = load_packed(path, trust_code=True)[0]
    assert torch.equal(loaded.weight, model.weight) and torch.equal(loaded.bias, model.bias)


@pytest.mark.parametrize("zip_format", [True, False])
def test_truncated_torch_file_gets_no_unsafe_advice(tmp_path, zip_format):
    path = tmp_path / "w.pt"
    torch.save(nn.Linear(3, 3).state_dict(), path, _use_new_zipfile_serialization=zip_format)
    path.write_bytes(path.read_bytes()[: 141 if not zip_format else -40])  # the legacy cut makes torch advise weights_only=False
    with pytest.raises(QDistillError, match="truncated") as e:
        load_checkpoint(path, model_spec("tiny"))
    assert "weights_only" not in str(e.value)


LAYOUT_EDITS = [
    ("shift an offset", lambda m: m["quantized"][1].update(indices=m["quantized"][1]["indices"] + 1)),
    ("huge shape", lambda m: m["quantized"][0].update(shape=[1 << 40, 1 << 40])),
    ("negative dim", lambda m: m["quantized"][0].update(shape=[-8, 9])),
    ("more bits", lambda m: m["quantized"][0].update(index_bits=8, n_points=256)),
    ("fewer buckets", lambda m: m["quantized"][-1].update(n_buckets=1)),
    ("kept overruns", lambda m: m["kept"][0].update(offset=10**9)),
    ("kept in a missing blob", lambda m: m["kept"][0].update(blob="fp.float64")),
    ("duplicate name", lambda m: m["kept"][0].update(name=m["quantized"][0]["name"])),
    ("entry not a dict", lambda m: m["quantized"].append(7)),
    ("bucket a string", lambda m: m["quantized"][0].update(bucket="256")),
    ("offset a float", lambda m: m["quantized"][1].update(indices=float(m["quantized"][1]["indices"]))),
    ("n_buckets a float", lambda m: m["quantized"][0].update(n_buckets=1.0)),
    ("kept entries overlap", lambda m: m["kept"][1].update(offset=m["kept"][0]["offset"])),
    ("no quantized tensor", lambda m: m.update(quantized=[])),
    ("preset size unhashable", lambda m: m["spec"]["kwargs"].update(size=[])),
    ("preset with a billion classes", lambda m: m["spec"]["kwargs"].update(num_classes=10**9)),
]


@pytest.mark.parametrize("edit", [e for _, e in LAYOUT_EDITS], ids=[n for n, _ in LAYOUT_EDITS])
def test_edited_layout_with_recomputed_checksum_is_refused(packed, tmp_path, edit):
    with pytest.raises(QDistillError):
        load_packed(rewrite(packed, tmp_path / "x.safetensors", edit))


def test_a_bucket_larger_than_its_tensor_allocates_nothing_for_padding(packed, tmp_path):
    """A crafted bucket size makes no padding: decoding a one-bucket tensor is as big as the tensor."""
    from qdistill.format.packed import decode_entry, read_packed

    with safe_open(str(packed), "pt") as f:
        bits_in_file = 8 * f.get_tensor("indices").numel()
    path = rewrite(packed, tmp_path / "x.safetensors", lambda m: m["quantized"][0].update(bucket=bits_in_file))  # the largest allowed
    meta, tensors = read_packed(path)
    out = decode_entry(meta["quantized"][0], tensors)
    assert out.untyped_storage().nbytes() == out.numel() * 4


def test_deeply_nested_metadata_is_refused(packed, tmp_path):
    with safe_open(str(packed), "pt") as f:
        raw = f.metadata()["qdistill"]
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    deep = raw.replace('"info":{', '"info":{"a":' + "[" * 5000 + "]" * 5000 + ",", 1)  # no json.dumps could write it
    save_file(tensors, str(tmp_path / "x.safetensors"), metadata={"qdistill": deep})
    with pytest.raises(QDistillError, match="corrupt"):
        load_packed(tmp_path / "x.safetensors")


def test_padding_overrun_is_refused(packed, tmp_path):
    """np.unpackbits would pad a short index blob with zeros: a shortened blob must not decode."""
    edit = lambda t: t.update(indices=t["indices"][:-3].clone())  # noqa: E731
    with pytest.raises(QDistillError, match="damaged or crafted"):
        load_packed(rewrite(packed, tmp_path / "x.safetensors", edit_tensors=edit))


JSON_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True), st.text(max_size=8),
    st.lists(st.integers(-5, 1 << 40), max_size=4),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_files_load_correctly_or_fail_cleanly(packed, tmp_path, data):
    """Truncation, bit flips, and metadata edits with a recomputed checksum: a model or a QDistillError, nothing else."""
    original = packed.read_bytes()
    kind = data.draw(st.sampled_from(["truncate", "flip", "edit", "edit-tensor"]))
    out = tmp_path / "fuzz.safetensors"
    if kind == "truncate":
        out.write_bytes(original[: data.draw(st.integers(0, len(original) - 1))])
    elif kind == "flip":
        raw = bytearray(original)
        for pos in data.draw(st.lists(st.integers(0, len(raw) - 1), min_size=1, max_size=4)):
            raw[pos] ^= 1 << data.draw(st.integers(0, 7))
        out.write_bytes(bytes(raw))
    elif kind == "edit":
        section = data.draw(st.sampled_from(["quantized", "kept"]))

        def edit(m):
            entries = m[section]
            entry = entries[data.draw(st.integers(0, len(entries) - 1))]
            entry[data.draw(st.sampled_from(sorted(entry)))] = data.draw(JSON_VALUES)

        rewrite(packed, out, edit)
    else:
        def edit_tensor(t):
            key = data.draw(st.sampled_from(sorted(t)))
            n = t[key].numel()
            t[key] = t[key][: data.draw(st.integers(0, n))].clone() if data.draw(st.booleans()) else torch.cat([t[key], t[key][:5]])

        rewrite(packed, out, edit_tensors=edit_tensor)
    try:
        model, meta = load_packed(out)
    except QDistillError:
        return
    reference = load_packed(packed)[0]  # what survived must be a complete model of the right shapes
    for (name, a), (_, b) in zip(model.state_dict().items(), reference.state_dict().items()):
        assert a.shape == b.shape and bool(torch.isfinite(a).all() if a.is_floating_point() else True), name
    with torch.no_grad():
        assert math.isfinite(float(sum(p.sum() for p in model.parameters())))


@pytest.fixture(scope="module")
def packed_options(tmp_path_factory):
    """Row groups, integer zero points, float16 scales, groups of 100: the first conv's rows of 9 are 8 groups
    (flat: 1 bucket), the second's rows of 72 are 16 (flat: 12), larger rows are cut into padded groups."""
    path = tmp_path_factory.mktemp("packed") / "options.safetensors"
    quantizer = UniformQuantizer(3, 100, groups="row", zero_point="int", scale_dtype="float16")
    return save_packed(quantized_model(quantizer=quantizer), model_spec("tiny"), path)


def set_first(key, value):
    def edit(tensors):
        t = tensors[key].clone()
        t[0] = value
        tensors[key] = t

    return edit


OPTION_EDITS = [  # (name, metadata edit, tensor edit)
    ("zero point over 2**bits - 1", None, set_first("zero_points", 8)),
    ("zero step", None, set_first("scales.float16", 0.0)),
    ("negative step", None, set_first("scales.float16", -0.5)),
    ("scales stored as float32", None, lambda t: t.update({"scales.float16": t["scales.float16"].float()})),
    ("zero points stored as int16", None, lambda t: t.update(zero_points=t["zero_points"].to(torch.int16))),
    ("zero points missing", None, lambda t: t.pop("zero_points")),
    ("scales under the float32 name", None, lambda t: t.update(scales=t.pop("scales.float16"))),
    ("entry claims float32 scales", lambda m: m["quantized"][0].update(scale_dtype="float32"), None),
    ("entry claims a float zero point", lambda m: m["quantized"][0].update(zero_point="float"), None),
    ("entry claims flat groups", lambda m: m["quantized"][0].update(groups="flat"), None),
    ("rows reshaped", lambda m: m["quantized"][0].update(shape=[4, 2, 3, 3]), None),  # as many weights, half the rows
    ("unknown groups", lambda m: m["quantized"][0].update(groups="column"), None),
    ("unknown zero point", lambda m: m["quantized"][0].update(zero_point="uint4"), None),
    ("unknown scale dtype", lambda m: m["quantized"][0].update(scale_dtype="float64"), None),
    ("scale dtype unhashable", lambda m: m["quantized"][0].update(scale_dtype=["float16"]), None),
    ("zero point offset shifted", lambda m: m["quantized"][1].update(zero_points=m["quantized"][1]["zero_points"] + 1), None),
    ("learned with an integer zero point", lambda m: [e.update(kind="learned", points=0) for e in m["quantized"][:1]], lambda t: t.update(points=torch.zeros(8))),
    ("a version from the future", lambda m: m.update(version=3), None),
    ("version true", lambda m: m.update(version=True), None),  # True == 1 in Python: not a version
    ("options in a version-1 file", lambda m: m.update(version=1), None),
]


@pytest.mark.parametrize("edit_meta,edit_tensors", [e[1:] for e in OPTION_EDITS], ids=[e[0] for e in OPTION_EDITS])
def test_crafted_option_files_are_refused(packed_options, tmp_path, edit_meta, edit_tensors):
    assert load_packed(packed_options)[0] is not None  # the unedited file loads
    with pytest.raises(QDistillError, match="crafted|damaged|not a qdistill-packed file"):
        load_packed(rewrite(packed_options, tmp_path / "x.safetensors", edit_meta, edit_tensors))


@pytest.mark.parametrize("edit_meta,edit_tensors", [e[1:] for e in OPTION_EDITS[:3]], ids=[e[0] for e in OPTION_EDITS[:3]])
def test_crafted_values_are_refused_by_inspect_too(packed_options, tmp_path, edit_meta, edit_tensors):
    from qdistill import inspect_packed

    with pytest.raises(QDistillError, match="crafted"):
        inspect_packed(rewrite(packed_options, tmp_path / "x.safetensors", edit_meta, edit_tensors))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_option_fields_load_correctly_or_fail_cleanly(packed_options, tmp_path, data):
    """Any value in the new fields, or a cut or lengthened zero-point or scale blob: a model or a QDistillError."""
    out = tmp_path / "fuzz.safetensors"
    if data.draw(st.booleans()):
        key = data.draw(st.sampled_from(["groups", "zero_point", "scale_dtype", "zero_points", "scales", "n_buckets"]))

        def edit(m):
            entry = m["quantized"][data.draw(st.integers(0, len(m["quantized"]) - 1))]
            entry[key] = data.draw(st.one_of(JSON_VALUES, st.sampled_from(["flat", "row", "float", "int", "float32", "float16", "bfloat16"])))

        rewrite(packed_options, out, edit)
    else:
        def edit_tensor(t):
            key = data.draw(st.sampled_from(["zero_points", "scales.float16"]))
            n = t[key].numel()
            t[key] = t[key][: data.draw(st.integers(0, n))].clone() if data.draw(st.booleans()) else torch.cat([t[key], t[key][:3]])

        rewrite(packed_options, out, edit_tensors=edit_tensor)
    try:
        model, _ = load_packed(out)
    except QDistillError:
        return
    reference = load_packed(packed_options)[0]
    for (name, a), (_, b) in zip(model.state_dict().items(), reference.state_dict().items()):
        assert a.shape == b.shape and bool(torch.isfinite(a).all() if a.is_floating_point() else True), name


def test_stored_values_whose_levels_overflow_are_refused(tmp_path):
    """Finite stored values can still give infinite weights (a range of -3e38 to 3e38): refused, not decoded to inf."""
    from qdistill.format.packed import read_packed

    path = save_packed(quantized_model(quantizer=UniformQuantizer(3, 100)), model_spec("tiny"), tmp_path / "m.safetensors")
    n_buckets = read_packed(path)[0]["quantized"][0]["n_buckets"]

    def edit(tensors):
        scales = tensors["scales"].clone()
        scales[0], scales[n_buckets] = -3e38, 3e38  # the first group's min and max
        tensors["scales"] = scales

    with pytest.raises(QDistillError, match="overflow float32"):
        load_packed(rewrite(path, tmp_path / "x.safetensors", edit_tensors=edit))


def one_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("qdistill: error: ") and err.count("\n") == 1 and "\x1b" not in err, err
    return err


ODD_NAME = "classifier.0.weight\x1b]0;owned\x07\x1b[2J"  # a terminal title and a screen clear, were it printed raw


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_a_checkpoint_with_non_finite_weights_is_refused_naming_the_tensor(tmp_path, capsys, value, suffix):
    """NaN weights would load and evaluate at chance: the file is refused, naming the tensor, quoted."""
    state = build_model(model_spec("tiny")).state_dict()
    state["classifier.0.weight"][3, 1] = value
    path = tmp_path / f"m{suffix}"
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save(state, path)
    assert main(["eval", str(path), "--model", "tiny", "--dataset", "tests.conftest:toy_dataset"]) == 2
    assert "the tensor 'classifier.0.weight' holds NaN or infinite values" in one_error(capsys)
    state[ODD_NAME] = state.pop("classifier.0.weight")
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save(state, path)
    assert main(["eval", str(path), "--model", "tiny", "--dataset", "tests.conftest:toy_dataset"]) == 2
    assert f"the tensor {ODD_NAME!r} holds NaN or infinite values" in one_error(capsys)


def test_a_packed_file_with_non_finite_full_precision_values_is_refused_naming_the_tensor(packed, tmp_path, capsys):
    kept = json.loads(safe_open(str(packed), "pt").metadata()["qdistill"])["kept"]
    first = next(e for e in kept if e["blob"] == "fp.float32")

    def nan(tensors):
        values = tensors["fp.float32"].clone()
        values[first["offset"] + 1] = float("nan")
        tensors["fp.float32"] = values

    evil = rewrite(packed, tmp_path / "x.safetensors", lambda m: m["kept"][kept.index(first)].update(name=ODD_NAME), nan)
    assert main(["eval", str(evil), "--dataset", "tests.export.test_untrusted:never_loaded"]) == 2
    assert f"the tensor {ODD_NAME!r} holds NaN or infinite values" in one_error(capsys)


BLOB_DTYPES = [  # a blob whose values are not of the dtype its name (or the format) says
    ("float weights as uint8", lambda t: t.update({"fp.float32": t["fp.float32"].to(torch.uint8)})),
    ("float weights as float64", lambda t: t.update({"fp.float32": t["fp.float32"].double()})),
    ("a batch count as float32", lambda t: t.update({"fp.int64": t["fp.int64"].float()})),
    ("indices as float32", lambda t: t.update(indices=t["indices"].float())),
    ("scales as float64", lambda t: t.update(scales=t["scales"].double())),
]


@pytest.mark.parametrize("edit", [e for _, e in BLOB_DTYPES], ids=[n for n, _ in BLOB_DTYPES])
def test_a_blob_of_another_dtype_is_refused_not_cast(packed, tmp_path, capsys, edit):
    evil = rewrite(packed, tmp_path / "x.safetensors", edit_tensors=edit)
    with pytest.raises(QDistillError, match="damaged or crafted"):
        load_packed(evil)
    assert main(["eval", str(evil), "--dataset", "tests.export.test_untrusted:never_loaded"]) == 2
    assert "damaged or crafted metadata" in one_error(capsys)


def test_tensor_names_in_layout_errors_are_quoted(packed, tmp_path, capsys):
    evil = rewrite(packed, tmp_path / "x.safetensors", lambda m: m["quantized"][0].update(name=ODD_NAME, shape=[-8, 9]))
    assert main(["eval", str(evil), "--dataset", "tests.export.test_untrusted:never_loaded"]) == 2
    assert f"({ODD_NAME!r}: shape [-8, 9])" in one_error(capsys)


def test_float_weights_moved_into_an_integer_blob_are_refused_not_cast(packed, tmp_path):
    """The kept float tensors rewritten as whole numbers into a well-typed blob fp.uint8 (once cast silently)."""
    evil = floats_into_uint8_blob(packed, tmp_path / "x.safetensors")
    with pytest.raises(QDistillError, match="is stored as torch.uint8, the model's is torch.float32"):
        load_packed(evil)
