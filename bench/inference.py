"""The low-bit inference runtime against dense weights: latency and resident memory of a stack of Linear layers.

For each width (4096 and 1024 by default), a stack of `--layers` Linear layers with biases is quantized
(row groups of 128, bf16 scales: what the int4 kernel reads) and saved packed at 4 and 2 bits, then run:

  fp32 dense    load_packed(file): today's loader, float32 weights
  bf16 dense    the same weights cast to bfloat16, bfloat16 inputs
  int4 kernel   load_packed(file, runtime="kernels") at 4 bits, and at 2 bits (the same kernel, 4-bit memory)
  per-call      4 bits in groups of 100, which no kernel takes: decoded to float32 at each call
  onnx runtime  the file exported by `qdistill export --format onnx` (integer zero points: MatMulNBits'
                fast path) run by ONNX Runtime at 4 and 2 bits, with float activations (accuracy_level 0)
                and with int8 ones (accuracy_level 4)

Each measurement runs alone in a fresh (spawned) process: the median latency at batch 1 and 32, and the
resident memory (RSS) after loading minus that of an idle process with the same imports; each row's
output on a fixed input is compared with that of its own file loaded dense (float32). Time it on an otherwise idle machine.
Writes bench/results/inference-<tag>.{json,md}.

    python bench/inference.py             # a few minutes on 2 CPU cores
    python bench/inference.py --quick     # a smoke run on small layers (its timings mean nothing; written to a temporary folder)
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import platform
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

RESULTS = Path(__file__).parent / "results"
ROWS = {  # name: (bits, bucket, zero point, runtime, dtype); runtime "onnx-N": ONNX Runtime at accuracy_level N
    "fp32 dense": (4, 128, "float", "dense", torch.float32),
    "bf16 dense": (4, 128, "float", "dense", torch.bfloat16),
    "int4 kernel, 4 bits": (4, 128, "float", "kernels", torch.float32),
    "int4 kernel, 2 bits": (2, 128, "float", "kernels", torch.float32),
    "per-call decode, 4 bits": (4, 100, "float", "kernels", torch.float32),
    "onnx runtime, 4 bits": (4, 128, "int", "onnx-0", torch.float32),
    "onnx runtime, 2 bits": (2, 128, "int", "onnx-0", torch.float32),
    "onnx runtime, 4 bits, int8 activations": (4, 128, "int", "onnx-4", torch.float32),
    "onnx runtime, 2 bits, int8 activations": (2, 128, "int", "onnx-4", torch.float32),
}


def stack(width: int, layers: int) -> nn.Sequential:
    return nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])


def rss_mib() -> float:
    """Resident memory now (not the peak): VmRSS from /proc (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def write_file(path: Path, width: int, layers: int, bits: int, bucket: int, zero_point: str) -> None:
    from qdistill import UniformQuantizer, attach, save_packed

    torch.manual_seed(0)
    model = stack(width, layers)
    attach(model, UniformQuantizer(bits, bucket, groups="row", zero_point=zero_point, scale_dtype="bfloat16"))
    save_packed(model.eval(), {"factory": "bench.inference:stack", "kwargs": {"width": width, "layers": layers}}, path)


def write_onnx(path: Path, width: int, layers: int, accuracy_level: int) -> Path:
    from qdistill.export.onnx import export_onnx

    onnx_path = path.with_name(f"{path.stem}-level{accuracy_level}.onnx")
    export_onnx(path, onnx_path, (probe(width),), model=stack(width, layers), dynamic={"x": {0: "batch"}}, accuracy_level=accuracy_level)
    return onnx_path


def onnx_session(path: str, threads: int):
    """An ONNX Runtime CPU session and a function running it on a tensor."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    return session, lambda x: torch.from_numpy(session.run(None, {"x": x.numpy()})[0])


def probe(width: int) -> torch.Tensor:
    """The fixed input each row's output is compared on."""
    return torch.randn(1, width, generator=torch.Generator().manual_seed(0))


def dense_output(path: Path, width: int, layers: int) -> list[float]:
    """The file's model loaded dense (float32) on the probe: what each row's output is compared with."""
    from qdistill import load_packed

    with torch.inference_mode():
        return load_packed(path, model=stack(width, layers))[0](probe(width))[0].tolist()


def median_ms(fn, reps: int, budget_s: float) -> float:
    """The median of up to `reps` timed calls after one warm-up, fewer where they pass `budget_s` seconds."""
    fn()
    times, start = [], time.perf_counter()
    while len(times) < reps and (not times or time.perf_counter() - start < budget_s):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def idle_job(threads: int) -> dict:
    """The floor: a process that imported torch and qdistill."""
    torch.set_num_threads(threads)
    importlib.import_module("qdistill.export.runtime")  # and with it the loader
    gc.collect()
    return {"row": "idle", "rss_mib": rss_mib(), "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run_job(row: str, path: str, width: int, layers: int, threads: int, reps: int, budget_s: float) -> dict:
    """Load the file as `row` says, then its resident memory, latency at batch 1 and 32, and its output on a fixed input."""
    torch.set_num_threads(threads)
    from qdistill import load_packed
    from qdistill.export.runtime import runtime_of

    _, _, _, kind, dtype = ROWS[row]
    start = time.perf_counter()
    if kind.startswith("onnx"):
        session, model = onnx_session(path, threads)
        counts = {}
    else:
        model = load_packed(path, model=stack(width, layers), runtime=kind)[0].to(dtype)
        counts = runtime_of(model)
    load_s = time.perf_counter() - start
    gc.collect()
    out = {"row": row, "width": width, "layers": layers, "load_s": load_s, "rss_mib": rss_mib(), **counts}
    with torch.inference_mode():
        for batch in (1, 32):
            x = torch.randn(batch, width, dtype=dtype)
            out[f"b{batch}_ms"] = median_ms(lambda: model(x), reps, budget_s)
        out["output"] = model(probe(width).to(dtype)).float()[0].tolist()
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def with_ratios(rows: list[dict], idle: dict, references: list[list[float]]) -> list[dict]:
    """Memory over the idle process; speed-ups and memory against fp32 dense of the same width; the output
    error against the row's own file loaded dense (`references`, one per row)."""
    done = []
    for r, reference in zip(rows, references):
        fp32 = next(f for f in rows if f["width"] == r["width"] and f["row"] == "fp32 dense")
        ref, got = torch.tensor(reference), torch.tensor(r["output"])
        mib = r["rss_mib"] - idle["rss_mib"]
        done.append({
            **{k: v for k, v in r.items() if k != "output"}, "mib": mib,
            "b1_speedup": fp32["b1_ms"] / r["b1_ms"], "b32_speedup": fp32["b32_ms"] / r["b32_ms"],
            "memory_ratio": (fp32["rss_mib"] - idle["rss_mib"]) / mib if mib > 0 else None,
            "max_rel_err": float((got - ref).abs().max() / ref.abs().max()),
        })  # fmt: skip
    return done


def markdown(rows: list[dict], setup: str) -> str:
    from qdistill.report import markdown_table

    columns = [
        ("width", "width", ""), ("row", "weights", ""), ("b1_ms", "batch 1 (ms)", ".2f"), ("b32_ms", "batch 32 (ms)", ".2f"),
        ("b1_speedup", "speed-up b1", ".2f"), ("b32_speedup", "speed-up b32", ".2f"), ("mib", "RSS over idle (MiB)", ",.1f"),
        ("memory_ratio", "fp32 / this", ".2f"), ("load_s", "load (s)", ".2f"), ("max_rel_err", "error vs dense", ".1e"),
    ]  # fmt: skip
    return (
        f"# Inference runtime: packed weights on low-bit kernels\n\n{setup}. Speed-ups and memory against fp32 dense of the same width; "
        "error vs dense: the largest difference of an output from the same file loaded dense (float32), over the largest output.\n\n"
    ) + markdown_table(rows, columns) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--widths", type=int, nargs="+", default=[4096, 1024])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--reps", type=int, default=20, help="timed calls per batch size (fewer past --budget seconds)")
    p.add_argument("--budget", type=float, default=10.0, help="seconds of timed calls per batch size at most")
    p.add_argument("--quick", action="store_true", help="smoke run: widths 512, 2 layers, 3 calls, written to a temporary folder unless --out")
    p.add_argument("--tag", default="cpu")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    if args.quick:
        args.widths, args.layers, args.reps, args.budget = [512], 2, 3, 1.0
    out = args.out or (Path(tempfile.mkdtemp(prefix="qdistill-inference-")) if args.quick else RESULTS)
    from qdistill.pipeline import worker_pool

    threads = torch.get_num_threads()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        files = {}
        for width in args.widths:
            for bits, bucket, zero in sorted({(b, k, z) for b, k, z, _, _ in ROWS.values()}):
                files[width, bits, bucket, zero] = Path(tmp) / f"w{width}-b{bits}-g{bucket}-{zero}.safetensors"
                write_file(files[width, bits, bucket, zero], width, args.layers, bits, bucket, zero)
        runs = [(row, files[w, bits, bucket, zero], w) for w in args.widths for row, (bits, bucket, zero, _, _) in ROWS.items()]
        references = [dense_output(path, w, args.layers) for _, path, w in runs]  # each row against its own packed file, loaded dense
        runs = [(row, write_onnx(path, w, args.layers, int(ROWS[row][3][5:])) if ROWS[row][3].startswith("onnx") else path, w) for row, path, w in runs]
        jobs = [(idle_job, threads)] + [(run_job, row, str(path), w, args.layers, threads, args.reps, args.budget) for row, path, w in runs]
        for fn, *job in jobs:  # one process each, one at a time: memory and timings are the job's own
            with worker_pool(1) as pool:
                rows.append(pool.submit(fn, *job).result())
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "output"}), flush=True)
    idle, measured = rows[0], with_ratios(rows[1:], rows[0], references)
    setup = (
        f"CPU ({platform.machine()}, {threads} threads), torch {torch.__version__}; a stack of {args.layers} Linear layers (with biases) per width, "
        f"row groups of 128 with bf16 scales (the per-call row: groups of 100); median of {args.reps} calls; RSS of an idle process: {idle['rss_mib']:.0f} MiB"
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / f"inference-{args.tag}.json").write_text(json.dumps({"setup": setup, "idle": idle, "rows": measured}, indent=1))
    md = markdown(measured, setup)
    (out / f"inference-{args.tag}.md").write_text(md)
    print(md)
    print(f"written to {out}")


if __name__ == "__main__":
    main()
