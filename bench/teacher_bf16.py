"""Does running the teacher in bfloat16 change what it teaches? all-MiniLM-L6-v2's embeddings of the Python
docs' validation sentences in float32 and in bfloat16 (weights and activations): their mean cosine, the
neighbour recall@10 of the bf16 embeddings against the fp32 ones, and the time of each pass (after a
warm-up pass). Writes bench/results/teacher-bf16-<tag>.{json,md}. Time it on an otherwise idle machine.

    python bench/teacher_bf16.py
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from pathlib import Path

import torch

from embedding import make_task, minilm_dir

from qdistill.tasks.embedding import neighbour_recall

RESULTS = Path(__file__).parent / "results"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sentences", type=int, default=1024, help="the first N validation sentences")
    p.add_argument("--tag", default="cpu")
    args = p.parse_args(argv)
    teacher, _, task = make_task(minilm_dir(), 2, 128)
    ids, lengths = (t[: args.sentences] for t in task.sentences["val"])
    rows = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = copy.deepcopy(teacher).to(dtype)
        task.embed(model, (ids, lengths))  # warm-up
        start = time.perf_counter()
        rows[str(dtype).removeprefix("torch.")] = (task.embed(model, (ids, lengths)), time.perf_counter() - start)
    (fp32, t32), (bf16, t16) = rows["float32"], rows["bfloat16"]
    result = {"sentences": len(ids), "mean_cos": (fp32 * bf16).sum(-1).mean().item(), "min_cos": (fp32 * bf16).sum(-1).min().item(),
              "nbr10": neighbour_recall(bf16, fp32, k=10), "fp32_s": t32, "bf16_s": t16, "speedup": t32 / t16,
              "setup": f"CPU ({platform.machine()}, {torch.get_num_threads()} threads), torch {torch.__version__}"}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"teacher-bf16-{args.tag}.json").write_text(json.dumps(result, indent=1))
    md = (f"# all-MiniLM-L6-v2 in bfloat16 against float32 ({args.tag})\n\n{result['setup']}; the first {len(ids)} validation sentences.\n\n"
          "| mean cosine | min cosine | neighbours@10 | fp32 (s) | bf16 (s) | bf16 speed-up |\n|---|---|---|---|---|---|\n"
          f"| {result['mean_cos']:.6f} | {result['min_cos']:.6f} | {result['nbr10']:.4f} | {t32:.2f} | {t16:.2f} | {result['speedup']:.2f} |\n")
    (RESULTS / f"teacher-bf16-{args.tag}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
