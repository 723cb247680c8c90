"""The operands of qdistill's kernel are checked in Python: the C code reads raw pointers and checks nothing."""

import pytest
import torch

from qdistill.runtime import lowbit

OUT, LENGTH, GROUP = 16, 64, 32


def operands(bits=4, learned=True, **changes):
    g = torch.Generator().manual_seed(0)
    ops = {
        "x": torch.randn(3, LENGTH, generator=g),
        "codes": lowbit.pack_codes(torch.randint(0, 2**bits, (OUT, LENGTH), generator=g), bits),
        "bits": bits,
        "group": GROUP,
        "scale": lowbit.pack_params(torch.rand(OUT, LENGTH // GROUP, generator=g)),
        "offset": lowbit.pack_params(torch.randn(OUT, LENGTH // GROUP, generator=g)),
        "points": lowbit.table(torch.rand(2**bits, generator=g)) if learned else None,
        "threads": 1,
    }
    return ops | {k: change(ops[k]) if callable(change) else change for k, change in changes.items()}


def never_called(*args):
    raise AssertionError("the kernel was reached")


def strided(t):
    """The same values and shape, not contiguous."""
    return t.mT.contiguous().mT if t.dim() > 1 else t.repeat_interleave(2)[::2]


@pytest.mark.parametrize(("bits", "learned"), [(1, False), (2, True), (4, True), (8, False)])
def test_good_operands_reach_the_kernel(bits, learned):
    calls = []
    y = lowbit.run(lambda *args: calls.append(args), **operands(bits, learned))
    assert len(calls) == 1 and y.shape == (3, OUT)


BAD = {
    "bias of another size": dict(bias=torch.zeros(OUT - 1)),
    "bias float64": dict(bias=torch.zeros(OUT, dtype=torch.float64)),
    "out of another row count": dict(out=OUT + 1),
    "x float64": dict(x=torch.Tensor.double),
    "x not contiguous": dict(x=strided),
    "x not on the cpu": dict(x=lambda x: torch.empty(x.shape, device="meta")),
    "x 3-d": dict(x=lambda x: x.view(3, 2, LENGTH // 2)),
    "x too narrow": dict(x=lambda x: x[:, : LENGTH // 2].contiguous()),
    "codes int64": dict(codes=lambda c: c.long()),
    "codes of 2 bits": dict(codes=lambda c: c[..., :1].contiguous()),
    "codes of one panel": dict(codes=lambda c: c[:1].contiguous()),
    "codes not contiguous": dict(codes=strided),
    "scale float64": dict(scale=torch.Tensor.double),
    "scale of one group": dict(scale=lambda s: s[:, :1].contiguous()),
    "offset of one panel": dict(offset=lambda s: s[:1].contiguous()),
    "offset not contiguous": dict(offset=strided),
    "points 15": dict(points=lambda p: p[:15].contiguous()),
    "points float16": dict(points=lambda p: p.half()),
    "points not contiguous": dict(points=strided),
    "points at 8 bits": dict(bits=8, codes=lambda c: torch.zeros(2, LENGTH, 8, dtype=torch.uint8)),
    "bits 0": dict(bits=0),
    "bits 9": dict(bits=9),
    "group odd": dict(group=1),
    "group without its scales": dict(group=20),  # 4 groups a row, scales for 2
    "inputs odd": dict(x=lambda x: x[:, :-1].contiguous(), codes=lambda c: c[:, :-1].contiguous()),
    "group 0": dict(group=0),
    "threads 0": dict(threads=0),
}


@pytest.mark.parametrize("bad", BAD)
def test_wrong_operands_raise_before_the_kernel(bad):
    with pytest.raises(ValueError):
        lowbit.run(never_called, **operands(**BAD[bad]))


@pytest.mark.parametrize("out", [17, 32])  # codes for 16 rows (1 to 16 outputs)
def test_matmul_refuses_codes_of_another_row_count(out, monkeypatch):
    monkeypatch.setattr(lowbit, "library", lambda: lowbit.Library(*[never_called] * len(lowbit.Library._fields)))
    ops = operands()
    with pytest.raises(ValueError):
        lowbit.matmul(ops["x"], ops["codes"], 4, GROUP, ops["scale"], ops["offset"], out, ops["points"])


@pytest.mark.parametrize("bad", ["x float64", "x not contiguous", "x not on the cpu", "x too narrow", "threads 0"])
def test_a_layers_checked_weights_still_get_each_input_checked(bad):
    with pytest.raises(ValueError):
        lowbit.run(never_called, **operands(**BAD[bad]), weights_checked=True)


def test_weights_moved_off_the_cpu_after_their_check_are_refused():
    """A layer checks its weights once; model.to(device) may move them later."""
    ops = operands(codes=lambda c: torch.empty(c.shape, dtype=c.dtype, device="meta"))
    with pytest.raises(ValueError, match="weights on the cpu"):
        lowbit.run(never_called, **ops, weights_checked=True)
