"""all-MiniLM-L6-v2 as users deploy it, side by side in one run: PyTorch fp32, ONNX Runtime fp32 and its
one-line dynamic int8 (`quantize_dynamic`, per channel), and qdistill's low-bit files on ONNX Runtime
(MatMulNBits and GatherBlockQuantized nodes; with int8 activations too) and on qdistill's kernels runtime.

Per row, on the held-out split (test; --split val to choose options): the mean and the least cosine to the
fp32 teacher's embeddings, neighbour recall@10 against the teacher's neighbours, title-to-section
retrieval@1, the file's size, the median latency for 1 sentence and for 32, and the memory the loaded
model holds (the process's resident memory after loading and one call, less before). The ptq rows are
made here (`--bits`, layout `--bucket` row groups with integer zero points, MSE ranges); a distilled file
joins with --files LABEL=FILE. Each row runs alone in a fresh process, one after another (the timings come
from a machine doing nothing else), and its result is kept in the work directory at once: a killed run
resumes row by row. Writes bench/results/minilm-<tag>.{json,md}.

    python bench/minilm.py                                      # the anchors and ptq at 8, 4, 3 and 2 bits
    python bench/minilm.py --files "qd 4b=runs/minilm4/qd-4b.safetensors" --tag cpu-qd
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch

from embedding import ROW32, make_task, minilm_dir
from inference import median_ms, status_mib  # bench/inference.py: the same timing and memory readings

from qdistill.pipeline import worker_pool
from qdistill.report import markdown_table

RESULTS = Path(__file__).parent / "results"
BATCHES = (1, 32)  # sentences per call


def float_onnx(teacher, out: Path) -> None:
    """The teacher as ONNX Runtime's users export it: fp32, token ids and mask in, pooled unit embedding out."""
    from qdistill.export.onnx import OPSET, Exported, signature

    sig = signature({"task": "embedding"}, {"kwargs": {"config": {"vocab_size": teacher.config.vocab_size}}})
    with torch.no_grad():
        torch.onnx.export(Exported(teacher, sig["head"]).eval(), sig["sample"], str(out), dynamo=False, opset_version=OPSET,
                          input_names=list(sig["input_names"]), output_names=[sig["output_name"]], dynamic_axes=sig["dynamic"])


def ptq_file(teacher, spec, task, bits: int, bucket: int, by_name: list[str], out: Path) -> None:
    import copy

    from qdistill import TrainConfig, save_packed, train

    cfg = TrainConfig(method="ptq", bits=bits, **{**ROW32, "bucket": bucket}, bucket_by_name=by_name)  # bench/embedding.py's layout
    result = train(copy.deepcopy(teacher), task, cfg, final_eval=False)
    save_packed(result.model, spec, out, info={"method": "ptq", "task": task.describe()}, overwrite=True)


def artifact(row: dict, teacher, spec, task, work: Path) -> Path | None:
    """The file a row runs, made the first time it is asked for."""
    if row["kind"] == "torch":
        return None
    path = Path(row["file"]) if row.get("file") else work / row["made"]
    if path.exists():
        return path
    if row["made"] == "fp32.onnx":
        float_onnx(teacher, path)
    elif row["made"] == "int8.onnx":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(str(artifact({"kind": "onnx", "made": "fp32.onnx"}, teacher, spec, task, work)), str(path), per_channel=True, weight_type=QuantType.QInt8)
    elif row["made"].endswith(".safetensors"):
        ptq_file(teacher, spec, task, row["bits"], row["bucket"], row["bucket_by_name"], path)
    else:  # a packed file as ONNX: source.safetensors -> source.accN.onnx
        from qdistill.export.onnx import export_onnx, signature
        from qdistill.format.packed import read_packed

        source = artifact({**row, "kind": "packed", "made": row["source"]}, teacher, spec, task, work) if not row.get("source_file") else Path(row["source_file"])
        sig = signature(read_packed(source)[0].get("info", {}).get("task", {}), spec)
        export_onnx(source, path, sig["sample"], sig["head"], sig["input_names"], sig["output_name"], sig["dynamic"], model=make_architecture(spec), accuracy_level=row["accuracy_level"])
    return path


def make_architecture(spec):
    from qdistill.models import build_model

    return build_model(spec)


class OnnxEncoder(torch.nn.Module):
    """An ONNX Runtime session as the embedding task runs models: a batch in, pooled unit embeddings out."""

    def __init__(self, path: Path, threads: int):
        import onnxruntime

        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(0))  # the task reads a model's device from its parameters
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def forward(self, batch: dict) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, {"input_ids": batch["x"].numpy(), "attention_mask": batch["mask"].numpy()})[0])


def load_row(row: dict, path: Path | None, spec: dict, model_dir: str, threads: int):
    """The row's model, as its users load it: the Hugging Face model, an ONNX Runtime session, or the packed file on the kernels runtime."""
    from qdistill.models.hf import load_hf
    from qdistill.runtime import load_packed

    if row["kind"] == "torch":
        return load_hf(model_dir, "encoder")[0]
    if row["kind"] == "onnx":
        return OnnxEncoder(path, threads)
    return load_packed(path, runtime="kernels")[0]  # as `qdistill eval --runtime kernels`: built from the file's spec, never dense first


def forward_of(row: dict, task):
    return (lambda model, batch: model(batch)) if row["kind"] == "onnx" else task.forward


def make_row_file(row: dict, setting: dict) -> str | None:
    """In a process of its own: the row's file, made if missing (its memory is not the measured process's)."""
    teacher, spec, task = make_task(Path(setting["model_dir"]), 2, setting["max_len"], setting["text_dir"])
    path = artifact(row, teacher, spec, task, Path(setting["work"]))
    return str(path) if path else None


def quality_job(row: dict, path: str | None, setting: dict, threads: int) -> dict:
    """Cosine, neighbours and retrieval on the split, against the fp32 teacher's embeddings."""
    torch.set_num_threads(threads)
    from qdistill.tasks.embedding import neighbour_recall, retrieval_recall

    _, spec, task = make_task(Path(setting["model_dir"]), 2, setting["max_len"], setting["text_dir"])
    model = load_row(row, Path(path) if path else None, spec, setting["model_dir"], threads)
    task.forward = forward_of(row, task)
    split = setting["split"]
    with torch.no_grad():
        ours, reference = task.embed(model, task.sentences[split]), task.cached_embeddings(task.reference, split, task.cache_dir)
        recall = retrieval_recall(*(task.embed(model, d) for d in task.sections[split]))
    cos = (ours * reference).sum(-1)
    return {"cos": cos.mean().item(), "min_cos": cos.min().item(), "nbr10": neighbour_recall(ours, reference, k=10), "r1": recall[1]}


def speed_job(row: dict, path: str | None, spec: dict, batches: dict, setting: dict, threads: int) -> dict:
    """In a fresh process that loads nothing else: the memory the loaded model holds, and its latency per batch."""
    torch.set_num_threads(threads)
    import onnxruntime  # noqa: F401  (every library imported first: its own memory is not the model's)

    import qdistill.models.hf  # noqa: F401
    import qdistill.runtime  # noqa: F401
    from qdistill.tasks.embedding import mean_pool

    before = status_mib("VmRSS")
    model = load_row(row, Path(path) if path else None, spec, setting["model_dir"], threads)
    if row["kind"] == "onnx":
        forward = model
    else:
        forward = lambda batch: mean_pool(model(input_ids=batch["x"], attention_mask=batch["mask"]).last_hidden_state, batch["mask"])  # noqa: E731
    with torch.no_grad():
        forward(batches[1])
        held = status_mib("VmRSS") - before
        return {"held_mib": held, **{f"ms_{n}": median_ms(lambda: forward(batches[n]), setting["reps"], budget_s=float("inf")) for n in BATCHES}}


def plan(bits: list[int], bucket: int, by_name: list[str], files: list[str]) -> list[dict]:
    rows = [{"label": "PyTorch fp32", "kind": "torch"}, {"label": "ONNX Runtime fp32", "kind": "onnx", "made": "fp32.onnx"},
            {"label": "ONNX Runtime int8 dynamic", "kind": "onnx", "made": "int8.onnx"}]
    layout = "".join(f"-{item.replace('*', '').replace('=', '').replace('/', '-')}" for item in by_name)
    sources = [(f"ptq {b}b", {"made": f"ptq-{b}b-{bucket}{layout}.safetensors", "bits": b, "bucket": bucket, "bucket_by_name": by_name}) for b in bits]
    sources += [(label, {"file": file}) for label, _, file in (f.partition("=") for f in files)]
    for label, source in sources:
        stem = Path(source.get("file") or source["made"]).stem
        onnx = {"source": source.get("made"), "source_file": source.get("file"), "bits": source.get("bits"), "bucket": bucket, "bucket_by_name": source.get("bucket_by_name")}
        rows += [{"label": f"qdistill {label}, ONNX Runtime", "kind": "onnx", **onnx, "made": f"{stem}.acc0.onnx", "accuracy_level": 0},
                 {"label": f"qdistill {label}, ONNX Runtime int8 activations", "kind": "onnx", **onnx, "made": f"{stem}.acc4.onnx", "accuracy_level": 4},
                 {"label": f"qdistill {label}, kernels", "kind": "kernels", **source}]
    return rows


def markdown(results: list[dict], setup: str) -> str:
    torch_ms = {n: next(r[f"ms_{n}"] for r in results if r["row"] == "PyTorch fp32") for n in BATCHES}
    rows = [{**r, **{f"x_{n}": torch_ms[n] / r[f"ms_{n}"] for n in BATCHES}} for r in results]
    columns = [("row", "what", ""), ("cos", "mean cosine", ".4f"), ("min_cos", "least cosine", ".3f"), ("nbr10", "neighbours@10", ".3f"),
               ("r1", "retrieval@1", ".3f"), ("size_mb", "file (MB)", ".1f"), ("ms_1", "1 sentence (ms)", ".1f"), ("x_1", "vs PyTorch", ".2f"),
               ("ms_32", "32 sentences (ms)", ".0f"), ("x_32", "vs PyTorch", ".2f"), ("held_mib", "memory held (MiB)", ".0f")]
    return f"{setup}\n\n" + markdown_table(rows, columns) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bits", type=int, nargs="*", default=[8, 4, 3, 2])
    p.add_argument("--bucket", type=int, default=32, help="row groups of the ptq rows (with integer zero points)")
    p.add_argument("--bucket-by-name", nargs="*", default=["*word_embeddings*=128"], help="GLOB=N: the ptq rows' groups of the tensors so named (default: the word table in groups of 128)")
    p.add_argument("--files", nargs="*", default=[], help="LABEL=FILE: packed MiniLM files to add (a distilled recipe's)")
    p.add_argument("--split", choices=("val", "test"), default="test")
    p.add_argument("--max-len", type=int, default=128)
    p.add_argument("--text-dir")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--work", type=Path, default=Path("runs/bench-minilm"))
    p.add_argument("--tag", default="cpu")
    args = p.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    setting = {"model_dir": str(minilm_dir()), "max_len": args.max_len, "text_dir": args.text_dir, "split": args.split, "reps": args.reps, "work": str(args.work)}
    _, spec, task = make_task(Path(setting["model_dir"]), 2, args.max_len, args.text_dir)
    batches = {n: task._batch(task.sentences[args.split], torch.arange(n)) for n in BATCHES}  # the split's first sentences
    results = []
    for row in plan(args.bits, args.bucket, args.bucket_by_name, args.files):
        key = f"{row['label']} {row.get('made', '')}"  # a ptq row's file name holds its layout: another layout is another row
        done = args.work / f"{key.strip().replace(' ', '_').replace('/', '-').replace(',', '')}.json"
        if not done.exists():
            result = {"row": row["label"]}
            with worker_pool(1) as pool:  # every job in a fresh process, one at a time
                path = pool.submit(make_row_file, row, setting).result()
            for job, *job_args in [(quality_job, row, path, setting, args.threads), (speed_job, row, path, spec, batches, setting, args.threads)]:
                with worker_pool(1) as pool:
                    result |= pool.submit(job, *job_args).result()
            result["size_mb"] = (Path(path).stat().st_size if path else sum(f.stat().st_size for f in Path(setting["model_dir"]).glob("*.safetensors"))) / 1e6
            done.write_text(json.dumps(result))
        results.append(json.loads(done.read_text()))
        print(json.dumps(results[-1]))
    setup = (f"all-MiniLM-L6-v2, {args.split} split of the Python docs' sentences (max {args.max_len} tokens), {args.threads} threads, "
             f"{platform.processor() or platform.machine()}; ptq: row groups of {args.bucket}{''.join(f', {item}' for item in args.bucket_by_name)}, integer zero points, MSE ranges.")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"minilm-{args.tag}.json").write_text(json.dumps({"setup": setup, "rows": results}, indent=1))
    (RESULTS / f"minilm-{args.tag}.md").write_text(markdown(results, setup))
    print(markdown(results, setup))


if __name__ == "__main__":
    main()
