import pytest
import torch

from qdistill.quant import pack_bits, packed_bytes, unpack_bits


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("count", [1, 3, 7, 8, 9, 255, 1001])
def test_pack_unpack_bit_exact(bits, count):
    idx = torch.randint(0, 2**bits, (count,), generator=torch.Generator().manual_seed(bits * 1000 + count))
    packed = pack_bits(idx, bits)
    assert packed.size == packed_bytes(count, bits) == -(-count * bits // 8)
    assert torch.equal(unpack_bits(packed, bits, count), idx)


def test_pack_rejects_out_of_range():
    with pytest.raises(ValueError):
        pack_bits(torch.tensor([4]), 2)


def test_bit_order_is_little_endian():
    assert pack_bits(torch.tensor([1, 2, 3, 0]), 2).tolist() == [0b00111001]
