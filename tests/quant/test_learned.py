import pytest
import torch

from qdistill.quant import LearnedPointsQuantizer, redistribute_points
from qdistill.quant.base import to_buckets


def make(w, n=4, bucket=3, init="uniform"):
    q = LearnedPointsQuantizer(bits=2, bucket=bucket, init=init)
    q.init_points(w, n)
    return q


def test_point_gradient_matches_hand_computation():
    w = torch.tensor([0.0, 0.2, 1.0, 10.0, 13.0, 16.0])  # buckets [0, .2, 1] (alpha 1), [10, 13, 16] (alpha 6)
    q = make(w, n=3)  # points 0, 0.5, 1
    g = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    (q(w) * g).sum().backward()
    # assignments: 0->p0, 0.2->p0, 1->p2 ; 0->p0, 0.5->p1, 1->p2
    expected = torch.tensor([1.0 * 1 + 1 * 2 + 6 * 4, 6 * 5, 1 * 3 + 6 * 6])
    assert torch.allclose(q.points.grad, expected)


def test_point_gradient_matches_finite_differences():
    torch.manual_seed(0)
    w = torch.randn(5, 7).double()
    q = make(w.float(), n=5, bucket=6).double()
    target = torch.randn(5, 7).double()

    def loss():
        return ((q(w) - target) ** 2).sum()

    loss().backward()
    grad = q.points.grad.clone()
    eps = 1e-6
    for j in range(5):
        with torch.no_grad():
            q.points[j] += eps
            up = loss().item()
            q.points[j] -= 2 * eps
            down = loss().item()
            q.points[j] += eps
        # a small move keeps every assignment, so the loss is smooth in p_j there
        assert abs((up - down) / (2 * eps) - grad[j].item()) < 1e-4 * max(1.0, abs(grad[j].item()))


def test_points_stay_sorted_and_in_range_after_steps():
    torch.manual_seed(0)
    w = torch.randn(64, 32)
    q = make(w, n=8, bucket=64, init="quantile")
    opt = torch.optim.SGD([q.points], lr=0.5)
    for _ in range(20):
        loss = (q(w) * torch.randn_like(w)).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        q.after_step(opt)
        p = q.points.detach()
        assert torch.all(p[1:] >= p[:-1]) and p.min() >= 0 and p.max() <= 1


@pytest.mark.parametrize("make_opt", [lambda p: torch.optim.Adam(p, lr=0.09), lambda p: torch.optim.SGD(p, lr=0.09, momentum=0.9)])
def test_crossing_points_keep_their_optimizer_state(make_opt):
    """Two points that cross and are re-sorted must move on as if they had been stored in sorted order all along."""

    def run(start, grad):
        q = LearnedPointsQuantizer(bits=1, bucket=None)
        with torch.no_grad():
            q.points.copy_(torch.tensor(start))
        opt = make_opt([q.points])
        for g in (grad, [0.0, 0.0]):  # a step in which they cross, then one with zero gradient
            q.points.grad = torch.tensor(g)
            opt.step()
            q.after_step(opt)
        return q.points.detach()

    crossed = run([0.45, 0.55], [-1.0, 1.0])
    assert torch.equal(crossed, run([0.55, 0.45], [1.0, -1.0]))  # the same moves, never crossing
    assert crossed[0] < 0.46 and crossed[1] > 0.54  # each keeps moving its own way, not pulled back


def test_quantile_initialization():
    torch.manual_seed(0)
    w = torch.randn(1000)
    q = make(w, n=5, bucket=None, init="quantile")
    x = (w - w.min()) / (w.max() - w.min())
    assert torch.allclose(q.points.detach(), torch.quantile(x, torch.linspace(0, 1, 5)), atol=1e-6)
    assert q.points[0] == 0 and q.points[-1] == 1


def test_bucket_min_and_max_exact_with_quantile_points():
    torch.manual_seed(1)
    w = torch.randn(4, 100)
    q = make(w, n=4, bucket=50, init="quantile")
    bw, bq = to_buckets(w, 50), to_buckets(q(w).detach(), 50)
    assert torch.equal(bw.amin(1), bq.amin(1)) and torch.equal(bw.amax(1), bq.amax(1))


def test_redistribution_keeps_the_total():
    for norms, total in [([1.0, 2.0, 3.0], 48), ([0.0, 0.0], 8), ([5.0, 0.1, 0.1, 0.1, 7.0], 80), ([1.0], 16)]:
        counts = redistribute_points(norms, total)
        assert sum(counts) == total
        assert all(c >= 2 for c in counts)
    counts = redistribute_points([1.0, 9.0], 32)
    assert counts[1] > counts[0] and counts[0] >= 8  # each keeps half its even share


def test_index_width_follows_point_count():
    q = make(torch.randn(100), n=5)
    assert q.index_bits == 3


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("init", ["quantile", "uniform"])
def test_half_precision_weights_quantize_as_their_float32_values(dtype, init):
    w = (torch.randn(20, 30, generator=torch.Generator().manual_seed(0)) * 0.05).to(dtype)
    w[3] = 0.01  # a constant bucket
    w[4, :2] = torch.tensor([0.0, 1e-3])  # a narrow one
    w[4, 2:] = 0.0
    q, q32 = LearnedPointsQuantizer(2, 30, init=init), LearnedPointsQuantizer(2, 30, init=init)
    q.init_points(w)
    q32.init_points(w.float())
    assert torch.equal(q.points, q32.points)
    out = q(w)
    assert out.dtype == dtype and torch.equal(out, q32(w.float()).to(dtype))  # every fp16/bf16 value is exact in fp32
    assert torch.equal(q.encode(w).indices, q32.encode(w.float()).indices)
    wr = w.clone().requires_grad_(True)
    g = torch.randn(20, 30).to(dtype)
    (q(wr) * g).sum().backward()
    assert torch.equal(wr.grad, g) and q.points.grad.dtype == torch.float32 and q.points.grad.isfinite().all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_points_converted_with_the_model_still_quantize(dtype):
    w = (torch.randn(20, 30, generator=torch.Generator().manual_seed(0)) * 0.05).to(dtype)
    q = LearnedPointsQuantizer(2, 30)
    q.init_points(w)
    q.to(dtype)  # as model.half() does
    ref = LearnedPointsQuantizer(2, 30)
    ref.points = torch.nn.Parameter(q.points.detach().float())
    assert torch.equal(q(w), ref(w)) and torch.equal(q.encode(w).indices, ref.encode(w).indices)


@pytest.mark.parametrize("scale_dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("bucket", [None, 8])
def test_row_groups_and_16_bit_scales(scale_dtype, bucket):
    """Rows quantized on their own, each group's min and max exact in the scale dtype, and Q(w) made of them alone."""
    w = torch.randn(6, 2, 3, 3, generator=torch.Generator().manual_seed(0)) * torch.logspace(-3, 3, 6).view(-1, 1, 1, 1)
    q = LearnedPointsQuantizer(2, bucket, groups="row", scale_dtype=scale_dtype)
    q.init_points(w)
    assert q.n_buckets(w.shape) == 6 * (1 if bucket is None else 3)  # rows of 18 values: 8, 8 and 2 (padded)
    enc = q.encode(w)
    dtype = getattr(torch, scale_dtype)
    assert all(torch.equal(v.to(dtype).float(), v) for v in (enc.lo, enc.hi))
    out = q(w).detach()
    assert torch.equal(out, enc.decode(w.shape, bucket, "row"))
    assert torch.equal(to_buckets(out, bucket, "row"), torch.lerp(enc.lo.view(-1, 1), enc.hi.view(-1, 1), q.points.detach()[to_buckets(enc.indices, bucket, "row")]))
    other = w.clone()
    other[1:] *= 1000
    assert torch.equal(q(other).detach()[0], out[0])  # row 0 does not see the others
    assert q.points.min() >= 0 and q.points.max() <= 1


def test_no_tensor_gets_more_points_than_8_bit_indices_address():
    """dq --bits 8 --redistribute: one tensor's share of 512 points would be 361, which a packed file cannot index."""
    assert redistribute_points([10.0, 1.0], 512) == [256, 151]
