import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qdistill import LearnedPointsQuantizer, QDistillError, UniformQuantizer
from qdistill.quant.base import MIN_RANGE, to_buckets
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
