"""Peak temporary memory and time of `pack_bits` (what `save_packed` spends per quantized tensor).

    python bench/packing.py [--entries 4194304] [--bits 4]

Run it from another checkout (PYTHONPATH=that checkout) to compare versions. numpy's allocations are
traced (tracemalloc), less the packed output itself; the input is made before tracing starts."""

from __future__ import annotations

import argparse
import time
import tracemalloc

import torch

from qdistill.quant.base import pack_bits, packed_bytes


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=1 << 22)
    parser.add_argument("--bits", type=int, default=4)
    args = parser.parse_args(argv)
    indices = torch.randint(0, 1 << args.bits, (args.entries,), generator=torch.Generator().manual_seed(0))
    out_mib = packed_bytes(args.entries, args.bits) / 2**20
    tracemalloc.start()
    start = time.perf_counter()
    pack_bits(indices, args.bits)
    seconds = time.perf_counter() - start
    peak_mib = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    print(f"| {args.entries:,} indices of {args.bits} bits | output {out_mib:.2f} MiB | peak {peak_mib:.2f} MiB "
          f"(temporaries {peak_mib - out_mib:.2f} MiB, {(peak_mib - out_mib) / out_mib:.1f}x the output) | {seconds * 1e3:.0f} ms |")


if __name__ == "__main__":
    main()
