import tracemalloc

import numpy as np
import pytest
import torch

from qdistill.quant import base, pack_bits, packed_bytes, unpack_bits


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("count", [1, 3, 7, 8, 9, 255, 1001])
@pytest.mark.parametrize("chunk", [8, 24, base.PACK_CHUNK])
def test_pack_unpack_bit_exact(bits, count, chunk, monkeypatch):
    monkeypatch.setattr(base, "PACK_CHUNK", chunk)
    idx = torch.randint(0, 2**bits, (count,), generator=torch.Generator().manual_seed(bits * 1000 + count))
    packed = pack_bits(idx, bits)
    assert packed.size == packed_bytes(count, bits) == -(-count * bits // 8)
    assert torch.equal(unpack_bits(packed, bits, count), idx)


def test_pack_rejects_out_of_range():
    with pytest.raises(ValueError):
        pack_bits(torch.tensor([4]), 2)


def test_bit_order_is_little_endian():
    assert pack_bits(torch.tensor([1, 2, 3, 0]), 2).tolist() == [0b00111001]


def reference_pack_bits(indices, bits):
    """`pack_bits` as it was first written (one int64 column per bit): the byte layout files must keep."""
    idx = indices.reshape(-1).to(torch.int64).numpy()
    planes = ((idx[:, None] >> np.arange(bits)) & 1).astype(np.uint8)
    return np.packbits(planes.reshape(-1), bitorder="little")


@pytest.mark.parametrize("chunk", [8, 24, None])  # None: the default chunk
@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_matches_the_reference_layout_across_chunks(monkeypatch, bits, chunk):
    if chunk:
        monkeypatch.setattr(base, "PACK_CHUNK", chunk)
    gen = torch.Generator().manual_seed(bits)
    for count in [*range(50), 1001, 70001]:
        idx = torch.randint(0, 2**bits, (count,), generator=gen)
        idx[: count // 3] = 2**bits - 1  # all ones: every bit of the words set
        assert np.array_equal(pack_bits(idx, bits), reference_pack_bits(idx, bits))


def test_pack_rejects_out_of_range_in_a_later_chunk(monkeypatch):
    monkeypatch.setattr(base, "PACK_CHUNK", 8)
    for bad in (4, -1):
        with pytest.raises(ValueError):
            pack_bits(torch.tensor([0] * 20 + [bad]), 2)


def test_pack_temporary_memory_is_bounded():
    """The old packing held 8 bytes per bit of every index (64 MiB here); numpy reports its allocations to tracemalloc."""
    idx = torch.randint(0, 16, (1 << 21,), generator=torch.Generator().manual_seed(0))
    tracemalloc.start()
    try:
        out = pack_bits(idx, 4)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak - out.nbytes < 2 << 20


@pytest.mark.parametrize("bits", [3, 5])  # (1, 2, 4 and 8 bits are read with shifts in format.packed)
def test_unpack_temporary_memory_is_bounded(bits):
    """The old unpacking held 8 bytes per bit of every index; the result's int64s are all it may need."""
    idx = torch.randint(0, 2**bits, (1 << 20,), generator=torch.Generator().manual_seed(0))
    packed = pack_bits(idx, bits)
    tracemalloc.start()
    try:
        out = unpack_bits(packed, bits, len(idx))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert torch.equal(out, idx) and peak < 2 << 20  # (the int64 result is torch's, not numpy's: untraced)


@pytest.mark.parametrize("bits", [0, 9, 16])
def test_pack_refuses_widths_it_cannot_pack(bits):
    with pytest.raises(ValueError, match="1 to 8 bits"):
        pack_bits(torch.zeros(16, dtype=torch.long), bits)
