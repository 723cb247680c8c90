"""The paper's Huffman estimate: mean code length of one Huffman code built over all level indices, plus the
table a decoder needs to rebuild that (canonical) code."""

from __future__ import annotations

import heapq

import numpy as np

LENGTH_BITS = 8  # per symbol in the table: a Huffman code over at most 256 symbols is at most 255 bits long


def table_bits(symbols: int) -> int:
    """Bits of a canonical code's table: one LENGTH_BITS code length (0: unused) for each of `symbols` symbols."""
    return LENGTH_BITS * symbols


def code_lengths(counts: np.ndarray) -> dict[int, int]:
    """Code length per symbol with a non-zero count (a lone symbol gets 1 bit)."""
    symbols = [(int(c), i, (s,)) for i, (s, c) in enumerate((s, c) for s, c in enumerate(counts) if c > 0)]
    if not symbols:
        return {}
    if len(symbols) == 1:
        return {symbols[0][2][0]: 1}
    lengths = {s[2][0]: 0 for s in symbols}
    heapq.heapify(symbols)
    tie = len(symbols)
    while len(symbols) > 1:
        c1, _, a = heapq.heappop(symbols)
        c2, _, b = heapq.heappop(symbols)
        for s in a + b:
            lengths[s] += 1
        heapq.heappush(symbols, (c1 + c2, tie, a + b))
        tie += 1
    return lengths


def mean_code_length(counts: np.ndarray) -> float:
    counts = np.asarray(counts, dtype=np.int64)
    lengths = code_lengths(counts)
    total = counts.sum()
    return float(sum(counts[s] * n for s, n in lengths.items()) / total) if total else 0.0
