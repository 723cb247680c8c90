"""What a language-model run costs on this machine, at the LM demo's scale (2k vocabulary, windows of 64).

1. Per model: training tokens per second (fp, and qd at 4 bits from the teacher's cached top-k targets),
   evaluation tokens per second, and the peak resident memory (RSS) of each run.
2. The teacher side: qd at 4 bits from a live teacher against its cached top-k targets (--topk), same
   seed and schedule: validation perplexity reached, training time, and what the cache costs to build and
   keeps on disk. This is what the default (`teacher_logits: cached`) was chosen on.

Every measurement runs alone in a fresh process (spawned), so its peak RSS is its own; an idle process
that imported the same libraries is measured too, as the floor. Time it on an otherwise idle machine.
Writes bench/results/lm-costs-<tag>.{json,md}.

    python bench/lm_costs.py                        # about 15 minutes on 2 CPU cores
    python bench/lm_costs.py --throughput-tokens 100000 --models lstm-tiny   # quicker
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
SCALE = {"task": "lm", "vocab_size": 2048, "seq_len": 64, "lr": 0.01}  # the LM demo's (qdistill/demo.py DEMOS["lm"])


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def make(train_tokens: int | None, eval_tokens: int | None):
    """The task and the LM demo's teacher (lstm-small, 2 epochs, from the cache or trained once), and the base config."""
    from accuracy import make_task

    from qdistill.pipeline import get_teacher
    from qdistill.tasks import TASKS
    from qdistill.train import TrainConfig

    def lm_task(train_subset, test_subset):
        return make_task({"task": "lm", "text_dir": None, "vocab_size": SCALE["vocab_size"], "seq_len": SCALE["seq_len"], "train_subset": train_subset, "test_subset": test_subset})

    full = lm_task(600_000, None)
    base = TrainConfig(**{**TASKS["lm"], "lr": SCALE["lr"]}, epochs=1)
    teacher = get_teacher(full, "lstm-small", base.replace(method="fp", epochs=2))  # the demo's: found in the cache
    return lm_task(train_tokens, eval_tokens), teacher, base


def idle_job(threads: int) -> dict:
    """The floor: a process that imported torch, transformers and qdistill and built the task."""
    torch.set_num_threads(threads)
    import transformers  # noqa: F401  (imported, as by the runs of the gpt-* models)

    make(10_000, 10_000)
    return {"job": "idle", "peak_rss_mib": peak_rss_mib()}


def throughput_job(model_name: str, method: str, train_tokens: int, eval_tokens: int, threads: int) -> dict:
    """One epoch over `train_tokens` tokens with `method`, then evaluation of `eval_tokens` validation tokens."""
    torch.set_num_threads(threads)
    from qdistill.models import build_model, count_parameters, model_spec
    from qdistill.pipeline import cache_dir
    from qdistill.train import train

    task, teacher, base = make(train_tokens, eval_tokens)
    cfg = base.replace(method=method, bits=4)
    model = build_model(model_spec(model_name, **task.spec_args()))
    if cfg.spec.distill:  # the cached targets are built before the clock starts, as in every run after the first
        task.teacher(teacher, cfg, cache_dir() / "logits")
    result = train(model, task, cfg, teacher=teacher if cfg.spec.distill else None, cache_dir=cache_dir() / "logits")
    task.evaluate(result.model, "val")  # warm: the first pass pays for one-time setup
    start = time.perf_counter()
    task.evaluate(result.model, "val")
    eval_s = time.perf_counter() - start
    return {
        "job": "throughput", "model": model_name, "params": count_parameters(model), "method": method,
        "train_tokens_per_s": result.samples_per_s * task.seq_len,
        "eval_tokens_per_s": len(task.corpus.split("val")) / eval_s,
        "peak_rss_mib": peak_rss_mib(),
    }


def teacher_job(teacher_logits: str, topk: int, threads: int) -> dict:
    """qd at 4 bits on lstm-tiny over the demo's 600k tokens, from a live teacher or its top-k targets."""
    torch.set_num_threads(threads)
    from qdistill.models import build_model, model_spec
    from qdistill.train import train

    task, teacher, base = make(600_000, None)
    cfg = base.replace(method="qd", bits=4, teacher_logits=teacher_logits, **({"topk": topk} if teacher_logits == "cached" else {}))
    with tempfile.TemporaryDirectory() as tmp:  # a cache of its own: its build is measured
        start = time.perf_counter()
        task.teacher(teacher, cfg, Path(tmp))
        build_s = time.perf_counter() - start
        cache_bytes = sum(f.stat().st_size for f in Path(tmp).rglob("*") if f.is_file())
        torch.manual_seed(0)
        model = build_model(model_spec("lstm-tiny", **task.spec_args()))
        result = train(model, task, cfg, teacher=teacher, cache_dir=Path(tmp))
    return {
        "job": "teacher", "teacher_logits": teacher_logits, "topk": topk if teacher_logits == "cached" else None,
        "val_ppl": result.val["ppl"], "train_s": result.train_seconds,
        "train_tokens_per_s": result.samples_per_s * task.seq_len,
        "cache_build_s": build_s if teacher_logits == "cached" else None, "cache_bytes": cache_bytes if teacher_logits == "cached" else None,
        "peak_rss_mib": peak_rss_mib(),
    }


def markdown(rows: list[dict], setup: str) -> str:
    from qdistill.report import markdown_table

    idle = next(r["peak_rss_mib"] for r in rows if r["job"] == "idle")
    speed = [{**r, "over_idle": r["peak_rss_mib"] - idle} for r in rows if r["job"] == "throughput"]
    teacher = [{**r, "cache_mib": r["cache_bytes"] / 2**20 if r["cache_bytes"] else None} for r in rows if r["job"] == "teacher"]
    return (
        f"# What a language-model run costs\n\n{setup}. Peak RSS of an idle process with the same imports and data: {idle:.0f} MiB.\n\n"
        "## Throughput and memory per model\n\n"
        + markdown_table(speed, [("model", "model", ""), ("params", "params", ","), ("method", "method", ""), ("train_tokens_per_s", "train tokens/s", ",.0f"),
                                 ("eval_tokens_per_s", "eval tokens/s", ",.0f"), ("peak_rss_mib", "peak RSS (MiB)", ",.0f"), ("over_idle", "over idle (MiB)", ",.0f")])
        + "\n\n## Live teacher or cached top-k targets (lstm-tiny, qd 4 bits, teacher lstm-small)\n\n"
        + markdown_table(teacher, [("teacher_logits", "teacher", ""), ("topk", "k", ""), ("val_ppl", "val. perplexity", ".2f"), ("train_s", "train time (s)", ".0f"),
                                   ("train_tokens_per_s", "train tokens/s", ",.0f"), ("cache_build_s", "cache build (s)", ".0f"), ("cache_mib", "cache (MiB)", ".1f"),
                                   ("peak_rss_mib", "peak RSS (MiB)", ",.0f")])
        + "\n"
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["lstm-tiny", "gpt-tiny", "lstm-small", "gpt-small"])
    p.add_argument("--throughput-tokens", type=int, default=200_000, help="training tokens per throughput run")
    p.add_argument("--eval-tokens", type=int, default=100_000)
    p.add_argument("--topk", type=int, nargs="+", default=[32], help="cached top-k sizes to compare with the live teacher")
    p.add_argument("--skip-teacher", action="store_true", help="only the throughput table")
    p.add_argument("--tag", default="cpu")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    from qdistill.pipeline import worker_pool

    threads = torch.get_num_threads()
    make(10_000, 10_000)  # the teacher trained (or found) and the corpus built here, before any measured job
    jobs = [(idle_job, threads)]
    jobs += [(throughput_job, m, method, args.throughput_tokens, args.eval_tokens, threads) for m in args.models for method in ("fp", "qd")]
    if not args.skip_teacher:
        jobs += [(teacher_job, "live", 0, threads)] + [(teacher_job, "cached", k, threads) for k in args.topk]
    rows = []
    for fn, *job in jobs:  # one process each, one at a time: peak RSS and timings are the job's own
        with worker_pool(1) as pool:
            rows.append(pool.submit(fn, *job).result())
        print(json.dumps(rows[-1]), flush=True)
    setup = f"CPU ({platform.machine()}, {threads} threads), torch {torch.__version__}; vocabulary {SCALE['vocab_size']}, windows of {SCALE['seq_len']}, batch 32; throughput runs: {args.throughput_tokens:,} training tokens, {args.eval_tokens:,} evaluated"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"lm-costs-{args.tag}.json").write_text(json.dumps({"setup": setup, "rows": rows}, indent=1))
    md = markdown(rows, setup)
    (args.out / f"lm-costs-{args.tag}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
