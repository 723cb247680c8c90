"""Sentence embeddings: a student encoder made to agree with a reference encoder (its teacher) on pooled,
normalized sentence embeddings, as sentence-transformers' all-MiniLM-L6-v2 pools them (the mean over
real tokens). Scored by what users of embeddings see: the cosine to the teacher's embedding, whether
each sentence keeps its nearest neighbours, and retrieval of a section's text from its title.

The metrics are relative to the reference, so the task holds it; the training target is the teacher's
embedding (cosine loss) and there are no labels: methods that train without a teacher do not apply."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from qdistill.data import epoch_order
from qdistill.data.text import load_tokenizer, tokenizer_failures
from qdistill.distill.teacher import CachedTeacher, LiveTeacher, model_digest, tensor_digest
from qdistill.errors import QDistillError
from qdistill.files import check_cache_entry, replaced_whole
from qdistill.modes import evaluating

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The unit-length mean of each sentence's token states over its real tokens (padding left out)."""
    mask = mask.unsqueeze(-1).to(hidden.dtype)
    return F.normalize((hidden * mask).sum(1) / mask.sum(1).clamp_min(1), dim=-1)


class Encoded(NamedTuple):
    """A batch's pooled unit embeddings and its token states after each layer (the embeddings' output first):
    what the layer-wise loss compares, student's against teacher's."""

    pooled: torch.Tensor
    hidden: tuple[torch.Tensor, ...]


def pooled_of(out) -> torch.Tensor:
    return out.pooled if isinstance(out, Encoded) else out


def layer_loss(student: tuple[torch.Tensor, ...], teacher: tuple[torch.Tensor, ...], mask: torch.Tensor) -> torch.Tensor:
    """The mean over layers of the student's squared error to the teacher's token states, relative to the
    teacher's mean square (so the weight does not depend on the states' scale), over real tokens. A
    student with fewer layers follows every k-th of the teacher's."""
    if len(student) < 2 or (len(teacher) - 1) % (len(student) - 1):
        raise QDistillError(f"the student has {len(student) - 1} layers, its teacher {len(teacher) - 1}: layer-wise targets (hidden_states) need a student whose layers divide the teacher's")
    step = (len(teacher) - 1) // (len(student) - 1)
    real = mask.unsqueeze(-1).to(student[0].dtype)
    errors = [((s - t).square() * real).sum() / (t.square() * real).sum().clamp_min(1e-12) for s, t in zip(student, teacher[::step])]
    return torch.stack(errors).mean()


def neighbour_recall(embeddings: torch.Tensor, reference: torch.Tensor, k: int = 10, chunk: int = 1024) -> float:
    """The mean share of each item's k nearest neighbours (by cosine, itself left out) under `reference`
    that are also among its k nearest under `embeddings`."""
    n, hits = len(embeddings), 0
    for start in range(0, n, chunk):
        rows = torch.arange(start, min(start + chunk, n))
        ours, theirs = embeddings[rows] @ embeddings.T, reference[rows] @ reference.T
        ours[torch.arange(len(rows)), rows] = theirs[torch.arange(len(rows)), rows] = -float("inf")
        a, b = ours.topk(k, dim=1).indices, theirs.topk(k, dim=1).indices
        hits += (a.unsqueeze(2) == b.unsqueeze(1)).any(2).sum().item()
    return hits / (n * k)


def retrieval_recall(queries: torch.Tensor, documents: torch.Tensor, ks=(1, 10)) -> dict[int, float]:
    """Query i's answer is document i: the share of queries whose answer ranks in the top k, per k."""
    scores = queries @ documents.T
    rank = (scores >= scores.diagonal().unsqueeze(1)).sum(1) - 1  # documents scored at or above the answer: ties lose
    return {k: (rank < k).float().mean().item() for k in ks}


def reference_tokenizer(tokenizer_json: str | Path):
    """The reference encoder's own tokenizer.json, which the sentences are encoded with; a missing one named."""
    if not Path(tokenizer_json).is_file():
        raise QDistillError(f"no tokenizer for the embedding task ({tokenizer_json} not found): give --tokenizer TOKENIZER.JSON (the teacher's own)")
    return load_tokenizer(Path(tokenizer_json))


class SentenceEmbedding:
    name = "embedding"
    metric = "cos"

    def __init__(self, sentences: dict[str, list[str]], sections: dict[str, list[tuple[str, str]]], tokenizer, reference: nn.Module,
                 max_len: int = 128, eval_batch_size: int = 64, corpus_name: str = "text", cache_dir=None):
        """`tokenizer` is a `tokenizers.Tokenizer` (the reference's own tokenizer.json); sentences longer than
        `max_len` tokens are cut. `sections`: (title, text) pairs of the held-out splits. The reference's
        embeddings of the held-out sentences are kept in `cache_dir` (None: computed in each process)."""
        if not isinstance(max_len, int) or isinstance(max_len, bool) or not 4 <= max_len <= 4096:
            raise QDistillError(f"max_len must be an integer from 4 to 4096, got {max_len!r}")
        for split in SPLITS:
            if len(sentences.get(split) or ()) < 2:
                raise QDistillError(f"the embedding task needs at least 2 {split} sentences, found {len(sentences.get(split) or ())}: give a larger --text-dir or subset")
        self.max_len, self.eval_batch_size, self.corpus_name, self.cache_dir = max_len, eval_batch_size, corpus_name, cache_dir
        self.reference = reference.eval()  # its gradients are never needed (embed runs under no_grad); a student copied from it stays trainable
        self.pad_id = tokenizer.token_to_id("[PAD]") or 0
        self.tokenizer_digest = hashlib.sha256(tokenizer.to_str().encode()).hexdigest()[:16]
        encode = lambda texts: self._encode(tokenizer, texts)  # noqa: E731
        self.sentences = {s: encode(sentences[s]) for s in SPLITS if sentences.get(s)}
        self.sections = {s: (encode([t for t, _ in pairs]), encode([d for _, d in pairs])) for s, pairs in sections.items() if pairs}
        self.texts_digest = hashlib.sha256(json.dumps(sentences["train"]).encode()).hexdigest()[:16]
        self._reference_embeddings: dict = {}
        self.layer_targets = False  # whether training compares token states layer by layer: the run's hidden_states, set by `teacher`

    @classmethod
    def from_folder(cls, folder: str | Path, tokenizer_json: str | Path, reference: nn.Module, train_subset: int | None = None,
                    eval_subset: int | None = None, max_len: int = 128, cache_dir=None) -> "SentenceEmbedding":
        """The sentences of a folder of reST files (the Python docs: `data.text.python_docs_dir()`) split by
        file, tokenized with the reference's own tokenizer.json; the first `train_subset` training and
        `eval_subset` validation and test sentences where given."""
        from qdistill.data.sentences import load_sections, load_sentences

        tokenizer = reference_tokenizer(tokenizer_json)
        folder = Path(folder)
        sentences = {s: load_sentences(folder, s)[: train_subset if s == "train" else eval_subset] for s in SPLITS}
        sections = {s: load_sections(folder, s) for s in ("val", "test")}
        return cls(sentences, sections, tokenizer, reference, max_len=max_len, corpus_name=folder.name, cache_dir=cache_dir)

    @classmethod
    def from_records(cls, path, text_field: str, tokenizer_json: str | Path, reference: nn.Module, train_subset: int | None = None,
                     eval_subset: int | None = None, max_len: int = 128, cache_dir=None) -> "SentenceEmbedding":
        """The rows of your data files (`data.records`: one sentence or passage each) with their splits, tokenized
        with the reference's own tokenizer.json. No titled sections: the metrics are cosine and neighbours."""
        from qdistill.data.records import records_texts

        tokenizer = reference_tokenizer(tokenizer_json)
        texts = records_texts(path, text_field, cache_dir)
        sentences = {s: texts[s][: train_subset if s == "train" else eval_subset] for s in SPLITS}
        return cls(sentences, {}, tokenizer, reference, max_len=max_len, corpus_name=Path(path).name, cache_dir=cache_dir and Path(cache_dir) / "logits")

    def _encode(self, tokenizer, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids [N, max_len] (padded) and lengths [N]."""
        with tokenizer_failures(lambda reason: f"the tokenizer failed on the sentences ({reason}): give the teacher's own tokenizer.json"):
            tokenizer.enable_truncation(self.max_len)
            tokenizer.no_padding()
            encodings = tokenizer.encode_batch(texts)
        ids = torch.full((len(texts), self.max_len), self.pad_id, dtype=torch.long)
        lengths = torch.tensor([len(e.ids) for e in encodings], dtype=torch.long)
        for i, e in enumerate(encodings):
            ids[i, : len(e.ids)] = torch.tensor(e.ids, dtype=torch.long)
        return ids, lengths

    def _batch(self, data: tuple[torch.Tensor, torch.Tensor], index: torch.Tensor) -> dict:
        ids, lengths = data[0][index], data[1][index]
        width = int(lengths.max())  # only as wide as the longest sentence of the batch
        return {"x": ids[:, :width], "mask": (torch.arange(width) < lengths.unsqueeze(1)).long(), "index": index}

    def train_size(self) -> int:
        return len(self.sentences["train"][0])

    def train_batch(self, epoch: int, position: int, cfg) -> dict:
        order = epoch_order(self.train_size(), cfg.seed, epoch)
        return self._batch(self.sentences["train"], order[position * cfg.batch_size : (position + 1) * cfg.batch_size])

    def ordered_batches(self, split: str, batch_size: int):
        data = self.sentences[split]
        for start in range(0, len(data[0]), batch_size):
            yield self._batch(data, torch.arange(start, min(start + batch_size, len(data[0]))))

    def forward(self, model: nn.Module, batch: dict) -> torch.Tensor | Encoded:
        """The pooled unit embeddings; in a run with layer-wise targets (`hidden_states`, set by `teacher`) a
        model being trained gives its token states of each layer too (`Encoded`), for the loss to compare."""
        if model.training and self.layer_targets:
            return self.encode(model, batch)
        return self.encode(model, batch, layers=False).pooled

    def encode(self, model: nn.Module, batch: dict, layers: bool = True) -> Encoded:
        out = model(input_ids=batch["x"], attention_mask=batch["mask"], **({"output_hidden_states": True} if layers else {}))
        if not hasattr(out, "last_hidden_state"):
            raise QDistillError(f"{type(model).__name__} gives no hidden states (last_hidden_state): the embedding task takes encoders (--hf-head encoder)")
        if layers and not getattr(out, "hidden_states", None):
            raise QDistillError(f"{type(model).__name__} gives no per-layer hidden states (output_hidden_states): layer-wise targets need a Hugging Face encoder; leave hidden_states at 0")
        return Encoded(mean_pool(out.last_hidden_state, batch["mask"]), tuple(out.hidden_states or ()) if layers else ())

    def loss(self, out: torch.Tensor | Encoded, target, batch: dict, cfg) -> torch.Tensor:
        if target is None:
            raise QDistillError("the embedding task learns from its teacher's embeddings: use a distilling method (kd, qd, dq, qd+dq) or ptq")
        ours, theirs = pooled_of(out), pooled_of(target)
        loss = (1 - (ours * theirs).sum(-1)).mean()
        if cfg.relational:  # the batch's cosine similarities: the embedding space's geometry, not only each direction
            loss = loss + cfg.relational * F.mse_loss(ours @ ours.T, theirs @ theirs.T)
        if cfg.hidden_states and isinstance(out, Encoded) and isinstance(target, Encoded):  # both sides' layers (a student in training, the live teacher)
            loss = loss + cfg.hidden_states * layer_loss(out.hidden, target.hidden, batch["mask"])
        return loss

    @torch.no_grad()
    def embed(self, model: nn.Module, data: tuple[torch.Tensor, torch.Tensor], progress=None) -> torch.Tensor:
        """The embedding of every sentence in `data`, in order, in eval mode; `progress(name, done, total)` is told each batch.

        Batches are made of sentences of similar length (sorted), so that little of each is padding."""
        device = next(model.parameters()).device
        order = torch.argsort(data[1], stable=True)
        out = torch.empty(0)
        with evaluating(model), parametrize.cached():  # quantized weights computed once, not per batch
            for start in range(0, len(order), self.eval_batch_size):
                index = order[start : start + self.eval_batch_size]
                embeddings = self.forward(model, {k: v.to(device) for k, v in self._batch(data, index).items()}).float().cpu()
                if not len(out):
                    out = torch.empty(len(order), embeddings.shape[1])
                out[index] = embeddings
                if progress is not None:
                    progress("teacher embeddings", start + len(index), len(order))
        return out

    def _reference(self, split: str) -> torch.Tensor:
        if split not in self._reference_embeddings:  # computed once per split (and kept in `cache_dir`)
            self._reference_embeddings[split] = self.cached_embeddings(self.reference, split, self.cache_dir)
        return self._reference_embeddings[split]

    def evaluate(self, model: nn.Module, split: str) -> dict[str, float]:
        """cos: mean cosine to the teacher's embedding; nbr10: neighbour recall@10 against the teacher's
        neighbours over the split's sentences; r1, r10: a section title retrieving its own section's text."""
        ours, reference = self.embed(model, self.sentences[split]), self._reference(split)
        if ours.shape != reference.shape:
            raise QDistillError(f"the model's embeddings have {ours.shape[1]} dimensions, its teacher's {reference.shape[1]}: compare a model with its own teacher")
        out = {"cos": (ours * reference).sum(-1).mean().item(), "nbr10": neighbour_recall(ours, reference, k=min(10, len(ours) - 1))}
        if split in self.sections:
            recall = retrieval_recall(*(self.embed(model, d) for d in self.sections[split]))
            out |= {"r1": recall[1], "r10": recall[10]}
        return out

    def has_split(self, split: str) -> bool:
        return split in self.sentences

    def describe(self) -> dict:
        return {"task": self.name, "max_len": self.max_len, "corpus": self.corpus_name}

    def data_key(self) -> str:
        return hashlib.sha256(f"{self.texts_digest}-{self.tokenizer_digest}-{self.max_len}".encode()).hexdigest()[:16]

    def spec_args(self) -> dict:
        return {}

    def sample(self) -> dict:
        return self._batch(self.sentences["train"], torch.arange(min(2, self.train_size())))

    def teacher(self, model: nn.Module, cfg, cache_dir, progress=None):
        """The live teacher (its token states too where `hidden_states` weighs them), or its embedding of every
        training sentence computed once and kept in `cache_dir`."""
        self.layer_targets = bool(cfg.hidden_states)
        if cfg.hidden_states:
            return LiveTeacher(model, self.encode)
        if cfg.teacher_logits == "live" or cache_dir is None:
            return LiveTeacher(model, self.forward)
        device = next(model.parameters()).device  # where the student's embeddings will be
        return CachedTeacher(self.cached_embeddings(model, "train", cache_dir, progress)).to(device)

    def cached_embeddings(self, model: nn.Module, split: str, cache_dir, progress=None) -> torch.Tensor:
        """`embed` of a split, kept in `cache_dir` (None: not kept) under the model's weights and the split's
        token ids: a teacher's embeddings (training targets, evaluation's reference) are computed once for every run."""
        if cache_dir is None:
            return self.embed(model, self.sentences[split], progress)
        key = hashlib.sha256(f"{model_digest(model)}-{tensor_digest(*self.sentences[split])}".encode()).hexdigest()[:24]
        path = Path(cache_dir) / f"teacher-embeddings-{key}.npy"
        if os.path.lexists(path):
            try:
                check_cache_entry(path)  # whoever can write it chooses the targets
                cached = np.load(path, allow_pickle=False)
            except (OSError, ValueError, QDistillError) as e:  # a damaged or foreign cache is recomputed, not trusted
                log.warning("ignoring the teacher-embedding cache %s: %s", path, e)
            else:
                if cached.shape[0] == len(self.sentences[split][0]) and cached.dtype == np.float32:
                    return torch.from_numpy(cached)
        embeddings = self.embed(model, self.sentences[split], progress)
        path.parent.mkdir(parents=True, exist_ok=True)
        with replaced_whole(path, mode=0o600) as tmp:
            np.save(tmp, embeddings.numpy())
        return embeddings
