import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qdistill import LearnedPointsQuantizer, QDistillError, UniformQuantizer
from qdistill.quant.base import FORMS, MIN_RANGE, kernel_ready, n_groups, to_buckets
from qdistill.quant.uniform import SCALES, clipped_range

shapes = st.sampled_from([(7,), (3, 5), (16, 33), (4, 3, 3, 3), (2, 300), (513,)])


def rand(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 3 + 1


@settings(max_examples=40, deadline=None)
@given(shape=shapes, bits=st.integers(1, 8), bucket=st.sampled_from([None, 1, 5, 16, 256]), seed=st.integers(0, 10_000))
def test_levels_min_max_and_idempotence(shape, bits, bucket, seed):
    w = rand(shape, seed)
    q = UniformQuantizer(bits, bucket).eval()
    wq = q(w)
    assert wq.shape == w.shape
    bw, bq = to_buckets(w, bucket), to_buckets(wq, bucket)
    for row_w, row_q in zip(bw, bq):
        assert len(torch.unique(row_q)) <= 2**bits
        assert row_q.min() == row_w.min() and row_q.max() == row_w.max()  # exact, not approximate
    assert torch.equal(q(wq), wq)


def test_each_value_goes_to_the_nearest_level():
    w = torch.tensor([0.0, 0.1, 0.49, 0.51, 0.7, 1.0])
    wq = UniformQuantizer(bits=2, bucket=None)(w)  # levels 0, 1/3, 2/3, 1
    assert torch.allclose(wq, torch.tensor([0.0, 0.0, 1 / 3, 2 / 3, 2 / 3, 1.0]))


def test_last_bucket_is_padded_with_the_last_value():
    w = torch.arange(10.0)
    b = to_buckets(w, 4)
    assert b.shape == (3, 4)
    assert b[-1].tolist() == [8.0, 9.0, 9.0, 9.0]
    # the padding changes no bucket range: the last bucket is quantized on [8, 9]
    wq = UniformQuantizer(bits=1, bucket=4)(w)
    assert wq[-2:].tolist() == [8.0, 9.0]


def test_bucket_runs_along_the_input_dimension():
    w = torch.stack([torch.zeros(4), torch.full((4,), 100.0)])  # rows [out, in]
    w[0, 1], w[1, 2] = 1.0, 101.0
    wq = UniformQuantizer(bits=1, bucket=4)(w)
    assert torch.equal(wq, w)  # two values per bucket: exactly representable with 1 bit


def test_constant_bucket_is_kept():
    w = torch.full((300,), 0.25)
    assert torch.equal(UniformQuantizer(2, 256)(w), w)


def test_stochastic_rounding_is_unbiased_and_only_in_training():
    w = torch.cat([torch.tensor([0.0, 1.0]), torch.full((20000,), 0.3)])
    q = UniformQuantizer(bits=1, bucket=None, stochastic=True).train()
    torch.manual_seed(0)
    mean = q(w)[2:].mean().item()
    assert abs(mean - 0.3) < 0.02  # 0.3 goes to 1 with probability 0.3
    q.eval()
    assert torch.equal(q(w)[2:], torch.zeros(20000))  # nearest at evaluation


@settings(max_examples=30, deadline=None)
@given(shape=shapes, bits=st.integers(1, 8), bucket=st.sampled_from([None, 5, 16, 256]), seed=st.integers(0, 10_000))
def test_mse_scale_is_never_worse_per_bucket_and_stays_in_range(shape, bits, bucket, seed):
    w = rand(shape, seed)
    err = {s: to_buckets(UniformQuantizer(bits, bucket, scale=s).eval()(w) - w, bucket).square().sum(1) for s in SCALES}
    assert torch.all(err["mse"] <= err["minmax"] * (1 + 1e-5) + 1e-12)  # min-max is one of the candidates
    bw = to_buckets(w, bucket)
    idx, lo, hi = UniformQuantizer(bits, bucket, scale="mse").levels(bw)
    assert idx.min() >= 0 and idx.max() < 2**bits
    assert torch.all(lo >= bw.amin(1, keepdim=True)) and torch.all(hi <= bw.amax(1, keepdim=True))


def test_mse_scale_clips_gaussian_buckets_at_2_bits():
    w = torch.randn(256 * 200, generator=torch.Generator().manual_seed(0))
    mse = {s: (UniformQuantizer(2, 256, scale=s)(w) - w).square().mean().item() for s in SCALES}
    assert mse["mse"] < 0.6 * mse["minmax"]  # the outer levels move in from the extremes


def test_mse_scale_chunked_search_gives_the_same_ranges():
    b = to_buckets(torch.randn(256 * 30, generator=torch.Generator().manual_seed(1)), 256)
    whole, chunked = clipped_range(b, 2), clipped_range(b, 2, max_elements=1000)  # one factor at a time
    assert all(torch.equal(x, y) for x, y in zip(whole, chunked))


def test_unknown_scale():
    with pytest.raises(QDistillError, match="scale must be one of minmax, mse"):
        UniformQuantizer(2, 256, scale="max")


@pytest.mark.parametrize("bits", range(1, 9))
def test_level_over_top_is_the_stored_point_bit_for_bit(bits):
    q = UniformQuantizer(bits)
    levels = torch.arange(2**bits, dtype=torch.float32)
    assert torch.equal(levels / (2**bits - 1), q.points[levels.long()])  # training computes one, the file stores the other


@pytest.mark.parametrize("quantizer", [UniformQuantizer(2, 16), UniformQuantizer(3, 256, scale="mse"), LearnedPointsQuantizer(2, 16)])
def test_channels_last_weight_gives_the_same_values_in_its_own_layout(quantizer):
    w = rand((8, 6, 3, 3), 0)
    w_cl = w.contiguous(memory_format=torch.channels_last)
    if isinstance(quantizer, LearnedPointsQuantizer):
        quantizer.init_points(w)
    q, q_cl = quantizer(w), quantizer(w_cl)
    assert torch.equal(q, q_cl)  # buckets follow the row-major order whatever the layout
    assert q_cl.is_contiguous(memory_format=torch.channels_last) and not q_cl.is_contiguous()
    assert torch.equal(quantizer.encode(w).indices, quantizer.encode(w_cl).indices)


def test_straight_through_gradient():
    w = torch.randn(40, 30, requires_grad=True)
    g = torch.randn(40, 30)
    (UniformQuantizer(2, 16)(w) * g).sum().backward()
    assert torch.equal(w.grad, g)


@pytest.mark.parametrize("bits", [0, 9, -1, 2.5, True])
def test_bits_out_of_range(bits):
    with pytest.raises(QDistillError, match="bits must be an integer from 1 to 8"):
        UniformQuantizer(bits)


@pytest.mark.parametrize("bucket", [0, -3, 1.5])
def test_bucket_not_positive(bucket):
    with pytest.raises(QDistillError, match="bucket must be a positive integer"):
        UniformQuantizer(4, bucket)


@pytest.mark.parametrize("bits,ratio", [(4, 7.53), (2, 14.2)])
def test_paper_size_ratio(bits, ratio):
    q = UniformQuantizer(bits, 256)
    n = 256 * 1000
    assert math.isclose(32 * n / q.size_bits(n), ratio, rel_tol=2e-3)
    assert UniformQuantizer(bits, 256).size_bits(257) == 257 * bits + 2 * 2 * 32


half = st.sampled_from([torch.float16, torch.bfloat16])


@settings(max_examples=150, deadline=None)
@given(
    dtype=half,
    bits=st.integers(1, 8),
    bucket=st.sampled_from([None, 2, 5, 16]),
    scale=st.sampled_from(SCALES),
    base=st.sampled_from([0.0, 1e-30, 1e-6, -0.03, 1.0, 300.0, -6e4, 6e4]),
    log_spread=st.one_of(st.none(), st.integers(-135, 17)),  # None: constant buckets
    seed=st.integers(0, 10_000),
)
def test_half_precision_narrow_and_wide_buckets_stay_finite_and_in_range(dtype, bits, bucket, scale, base, log_spread, seed):
    spread = 0.0 if log_spread is None else 2.0**log_spread
    top = torch.finfo(torch.float16).max if dtype == torch.float16 else 1e38  # a bf16 range over fp32's max overflows as fp32 weights do
    w = (base + spread * torch.randn(40, generator=torch.Generator().manual_seed(seed))).clamp(-top, top).to(dtype)
    q = UniformQuantizer(bits, bucket, scale=scale).eval()
    out = q(w)
    assert out.dtype == dtype and out.isfinite().all()
    assert torch.equal(out, q(w.float()).to(dtype))  # every fp16/bf16 value is exact in fp32: the fp32 result, rounded
    bw, bq = to_buckets(w, bucket), to_buckets(out, bucket)
    lo, hi = bw.amin(1, keepdim=True), bw.amax(1, keepdim=True)
    assert torch.all((bq >= lo) & (bq <= hi))
    if scale == "minmax":
        wide = (hi.float() - lo.float()) >= MIN_RANGE  # narrower ranges go to their minimum, as in fp32
        assert torch.equal(bq.amin(1, keepdim=True), lo) and torch.equal(bq.amax(1, keepdim=True)[wide], hi[wide])
    enc = q.encode(w)
    assert torch.equal(enc.indices, q.encode(w.float()).indices) and enc.lo.dtype == enc.hi.dtype == torch.float32
    noisy = UniformQuantizer(bits, bucket, stochastic=True, scale=scale).train()(w)
    assert noisy.isfinite().all() and torch.all((to_buckets(noisy, bucket) >= lo) & (to_buckets(noisy, bucket) <= hi))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("values", [[0.25] * 4, [0.0, 1e-3, 5e-4, 2e-4], [0.0, 6e-8, 0.0, 6e-8], [-6e4, 6e4, 0.0, 1.0]])
def test_half_precision_degenerate_narrow_and_wide_buckets(dtype, values):
    w = torch.tensor(values).to(dtype)
    for q in (UniformQuantizer(8, None), UniformQuantizer(2, None), UniformQuantizer(8, None, scale="mse")):
        out = q(w)
        assert out.isfinite().all() and out.min() == w.min() and out.max() == w.max()


# Kernel-ready options: row groups, integer zero point, 16-bit scale dtype (docs/quantizer-options.md)

options = st.fixed_dictionaries(
    {"groups": st.sampled_from(["flat", "row"]), "zero_point": st.sampled_from(["float", "int"]), "scale_dtype": st.sampled_from(["float32", "float16", "bfloat16"])}
)
straddling = st.sampled_from([(3, 5), (6, 7), (4, 3, 3, 3), (5, 2, 3)])  # rows of 5, 7, 27, 6 values


@settings(max_examples=40, deadline=None)
@given(shape=straddling, bits=st.integers(1, 4), bucket=st.sampled_from([None, 2, 4, 16]), scale=st.sampled_from(SCALES), opts=options, seed=st.integers(0, 10_000))
def test_row_groups_never_straddle_rows(shape, bits, bucket, scale, opts, seed):
    """Each row's quantized values depend on that row alone: scaling another row changes nothing in it."""
    w = rand(shape, seed)
    q = UniformQuantizer(bits, bucket, scale=scale, **{**opts, "groups": "row"}).eval()
    out = q(w)
    for r in range(shape[0]):
        other = w.clone()
        other[torch.arange(shape[0]) != r] *= 1000  # every other row's groups get a far wider range
        assert torch.equal(q(other)[r], out[r])
    assert q.n_buckets(shape) == n_groups(shape, bucket, "row") == shape[0] * (1 if bucket is None else math.ceil(math.prod(shape[1:]) / bucket))


def test_flat_buckets_do_straddle_rows():
    """The counter-example the row-groups test rules out (buckets of 4 over rows of 5)."""
    w = rand((3, 5), 0)
    q = UniformQuantizer(2, 4)
    other = w.clone()
    other[1:] *= 1000
    assert not torch.equal(q(other)[0], q(w)[0])


def test_row_groups_pad_each_row_with_its_last_value():
    w = torch.arange(10.0).view(2, 5)
    assert to_buckets(w, 4, "row").tolist() == [[0, 1, 2, 3], [4, 4, 4, 4], [5, 6, 7, 8], [9, 9, 9, 9]]
    assert to_buckets(w, None, "row").tolist() == w.tolist()
    wq = UniformQuantizer(1, 4, groups="row")(w)  # the lone value of each row's last group keeps its own range
    assert wq[:, -1].tolist() == [4.0, 9.0]


def test_global_row_groups_are_one_group_per_channel():
    w = rand((6, 4, 3, 3), 1)
    q = UniformQuantizer(3, None, groups="row")
    assert q.n_buckets(w.shape) == 6
    per_row = torch.stack([UniformQuantizer(3, None)(row) for row in w])
    assert torch.equal(q(w), per_row)
    assert torch.equal(q(w).amin((1, 2, 3)), w.amin((1, 2, 3))) and torch.equal(q(w).amax((1, 2, 3)), w.amax((1, 2, 3)))


@pytest.mark.parametrize("scale", SCALES)
def test_a_row_shorter_than_its_bucket_is_one_unpadded_group(scale):
    """Rows of 9 (a 3x3 conv) with buckets of 256: one group a row, as with bucket None; padding each row with
    247 copies of its last value would make that value dominate the clipped range's error (scale mse)."""
    w = torch.randn(512, 1, 3, 3, generator=torch.Generator().manual_seed(0))
    short, per_row = UniformQuantizer(2, 256, scale=scale, groups="row"), UniformQuantizer(2, None, scale=scale, groups="row")
    assert torch.equal(short(w), per_row(w))
    enc = short.encode(w)
    assert enc.indices.shape == w.shape and enc.lo.numel() == short.n_buckets(w.shape) == 512


@pytest.mark.parametrize(
    "shape,bucket,groups,ready",
    [
        ((8, 64), 32, "row", True), ((8, 60), 32, "row", False), ((8, 60), None, "row", True), ((16, 4, 3, 3), 12, "row", True),
        ((16, 4, 3, 3), 32, "row", False), ((8, 64), 256, "row", True), ((8, 64), 32, "flat", True), ((8, 64), None, "flat", False), ((8, 60), 32, "flat", False),
    ],
)  # fmt: skip
def test_kernel_ready_says_whether_groups_tile_the_rows(shape, bucket, groups, ready):
    assert kernel_ready(shape, bucket, groups) is ready


def group_values(q, w):
    """Q(w) from the encoded form by the stated formulas, group by group."""
    enc = q.encode(w)
    idx = to_buckets(enc.indices, q.bucket, q.groups).float()
    p = {k: v.view(-1, 1) for k, v in enc.params.items()}
    if q.form == "int-zero":
        return enc, (idx - p["zero"]) * p["step"]
    if q.form == "min-step":
        return enc, p["lo"] + idx * p["step"]
    return enc, torch.lerp(p["lo"], p["hi"], idx / (2**q.bits - 1))


@settings(max_examples=60, deadline=None)
@given(shape=shapes, bits=st.integers(1, 8), bucket=st.sampled_from([None, 5, 16]), scale=st.sampled_from(SCALES), opts=options, seed=st.integers(0, 10_000))
def test_the_forward_uses_exactly_the_stored_values(shape, bits, bucket, scale, opts, seed):
    """Stored values exact in the scale dtype, zero points integers in range, and Q(w) computed from them alone."""
    w = rand(shape, seed)
    q = UniformQuantizer(bits, bucket, scale=scale, **opts).eval()
    enc, values = group_values(q, w)
    assert set(enc.params) == set(FORMS[q.form]) and all(v.numel() == q.n_buckets(shape) for v in enc.params.values())
    dtype = getattr(torch, opts["scale_dtype"])
    for k, v in enc.params.items():
        assert v.dtype == torch.float32 and torch.equal(v.to(dtype).float(), v), k
    if "zero" in enc.params:
        z = enc.params["zero"]
        assert torch.equal(z, z.round()) and z.min() >= 0 and z.max() <= 2**bits - 1
    if "step" in enc.params:
        assert (enc.params["step"] > 0).all()
    assert torch.equal(to_buckets(q(w), bucket, q.groups), values)


@settings(max_examples=40, deadline=None)
@given(shape=shapes, bits=st.integers(1, 8), bucket=st.sampled_from([None, 5, 16]), groups=st.sampled_from(["flat", "row"]), seed=st.integers(0, 10_000))
def test_integer_zero_point_follows_the_formula(shape, bits, bucket, groups, seed):
    """scale = (max - min) / (2**b - 1) over the range widened to hold 0, zp = clamp(round(-min / scale)),
    q = clamp(round(w / scale) + zp), w_q = (q - zp) * scale; zero is a level."""
    w = rand(shape, seed)
    q = UniformQuantizer(bits, bucket, groups=groups, zero_point="int").eval()
    top = 2**bits - 1
    b = to_buckets(w, bucket, groups)
    lo, hi = b.amin(1, keepdim=True).clamp(max=0), b.amax(1, keepdim=True).clamp(min=0)
    scale = (hi - lo) / top
    zp = (-lo / scale).round().clamp(0, top)
    level = ((b / scale).round() + zp).clamp(0, top)
    assert torch.equal(to_buckets(q(w), bucket, groups), (level - zp) * scale)
    assert torch.equal(to_buckets(q.encode(w).indices, bucket, groups).float(), level)
    assert torch.equal(q(torch.zeros(shape)), torch.zeros(shape))


def test_integer_zero_point_by_hand():
    w = torch.tensor([-1.0, 0.0, 0.5, 2.0])  # scale 1, zero point 1: 0.5 rounds to the even 0
    q = UniformQuantizer(2, None, zero_point="int")
    assert q(w).tolist() == [-1.0, 0.0, 0.0, 2.0] and q.encode(w).params["zero"].tolist() == [1.0]
    positive = torch.tensor([1.0, 2.0, 3.0])  # the range is widened to [0, 3]: zero point 0, every value exact
    assert q(positive).tolist() == [1.0, 2.0, 3.0] and q.encode(positive).params["zero"].tolist() == [0.0]


def test_min_step_form_stores_a_16_bit_min_and_step():
    w = torch.tensor([0.1, 0.2, 0.7, 1.1])
    q = UniformQuantizer(2, None, scale_dtype="float16")
    enc = q.encode(w)
    lo, step = torch.tensor(0.1).half().float(), (torch.tensor(1.1) - 0.1).div(3).half().float()
    assert enc.params["lo"].tolist() == [lo.item()] and enc.params["step"].tolist() == [step.item()]
    assert torch.equal(q(w), enc.indices.float() * step + lo)


@pytest.mark.parametrize("opts", [{"zero_point": "int"}, {"scale_dtype": "float16"}, {"zero_point": "int", "scale_dtype": "bfloat16", "groups": "row"}])
def test_stochastic_rounding_with_kernel_options_is_unbiased(opts):
    w = torch.cat([torch.tensor([0.0, 1.0]), torch.full((20000,), 0.3)]).view(1, -1)
    q = UniformQuantizer(bits=1, bucket=None, stochastic=True, **opts).train()
    torch.manual_seed(0)
    levels = torch.tensor(sorted(set(UniformQuantizer(1, None, **opts).eval()(torch.tensor([[0.0, 1.0]])).flatten().tolist())))
    out = q(w)[0, 2:]
    assert set(out.unique().tolist()) <= set(levels.tolist())  # only the two levels
    assert abs(out.mean().item() - 0.3) < 0.02
    assert torch.equal(q.eval()(w)[0, 2:], torch.full((20000,), levels[0].item()))  # nearest at evaluation


@settings(max_examples=30, deadline=None)
@given(shape=shapes, bits=st.integers(1, 4), bucket=st.sampled_from([None, 5, 16]), opts=options, seed=st.integers(0, 10_000))
def test_mse_scale_with_kernel_options_is_never_worse_per_group(shape, bits, bucket, opts, seed):
    """The clipped range is searched on the option's own grid, min-max among the candidates."""
    w = rand(shape, seed)
    err = {s: to_buckets(UniformQuantizer(bits, bucket, scale=s, **opts).eval()(w) - w, bucket, opts["groups"]).square().sum(1) for s in SCALES}
    assert torch.all(err["mse"] <= err["minmax"] * (1 + 1e-5) + 1e-12)


@pytest.mark.parametrize("scale_dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("zero_point", ["float", "int"])
def test_tiny_and_huge_groups_keep_a_finite_positive_step(scale_dtype, zero_point):
    w = torch.tensor([[0.0, 1e-9, 5e-10, 2e-10], [1e5, 1e5 + 1, -3e5, 7.0], [0.25] * 4])
    q = UniformQuantizer(4, None, groups="row", zero_point=zero_point, scale_dtype=scale_dtype)
    enc = q.encode(w)
    assert all(v.isfinite().all() for v in enc.params.values()) and (enc.params["step"] > 0).all()
    assert q(w).isfinite().all() and (q(w)[0] - w[0]).abs().max() < 1e-6


def test_straight_through_gradient_with_kernel_options():
    w = torch.randn(40, 30, requires_grad=True)
    g = torch.randn(40, 30)
    (UniformQuantizer(2, 16, groups="row", zero_point="int", scale_dtype="bfloat16")(w) * g).sum().backward()
    assert torch.equal(w.grad, g)


@pytest.mark.parametrize("option,value", [("groups", "column"), ("zero_point", "uint8"), ("scale_dtype", "float64"), ("scale_dtype", torch.float16)])
def test_unknown_option_values_are_named(option, value):
    with pytest.raises(QDistillError, match=f"{option} must be one of"):
        UniformQuantizer(4, 32, **{option: value})
    if option != "zero_point":
        with pytest.raises(QDistillError, match=f"{option} must be one of"):
            LearnedPointsQuantizer(4, 32, **{option: value})


@pytest.mark.parametrize(
    "opts,ratio",
    [({}, 32 * 32 / (32 * 4 + 64)), ({"scale_dtype": "float16"}, 32 * 32 / (32 * 4 + 32)), ({"zero_point": "int", "scale_dtype": "bfloat16"}, 32 * 32 / (32 * 4 + 16 + 8))],
)
def test_size_accounting_follows_the_scale_dtype_and_zero_point(opts, ratio):
    q = UniformQuantizer(4, 32, groups="row", **opts)
    assert 32 * 64 * 96 / q.size_bits((64, 96)) == pytest.approx(ratio)
    assert q.size_bits((64, 90)) == 64 * 90 * 4 + 64 * 3 * (q.size_bits((1, 32)) - 32 * 4)  # 3 groups a row, the last padded
