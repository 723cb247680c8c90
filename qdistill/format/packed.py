"""The packed file: a safetensors file whose quantized weights take b bits each on disk.

Tensors (few, so the safetensors header stays small next to the payload):
  indices      uint8    every quantized tensor's level indices, bit-packed, each tensor starting on a byte
  scales       float32  per tensor, its groups' two stored values (quant.base.FORMS): by default the lowest
                        then highest level (min and max, or the clipped range); an integer zero point's step
  scales.float16, scales.bfloat16   the same, for tensors whose scale dtype is 16-bit
  zero_points  uint8    integer zero points, one per group
  points       float32  the codebooks of learned-points tensors (uniform levels are i / (2**b - 1))
  fp.<dtype>            every tensor kept at full precision, concatenated per dtype
Metadata "qdistill" (JSON): format version, model spec, per-tensor layout (with each tensor's groups,
zero_point and scale_dtype; a version-1 file has none: the defaults), and a SHA-256 over the rest.

This module writes, checks and decodes the file; `qdistill.runtime` loads it into a model.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from torch import nn

from qdistill.errors import QDistillError
from qdistill.files import write_safetensors
from qdistill.format.huffman import mean_code_length, table_bits
from qdistill.models import check_finite
from qdistill.quant import LearnedPointsQuantizer, pack_bits, packed_bytes, quantized_tensors, unpack_bits
from qdistill.quant.base import FORMS, GROUPS, SCALE_DTYPES, Encoded, dequantize, form, group_bits, kernel_ready, n_groups, row_group_size, row_view
from qdistill.quant.uniform import ZERO_POINTS

FORMAT = "qdistill-packed"
VERSION = 2  # 2: groups, zero_point and scale_dtype per tensor; an older reader refuses the file instead of misreading it
# A file whose tensors all keep the paper's defaults is written as version 1, byte for byte as before the
# options existed: older qdistill versions read it, and its size is unchanged.
READABLE = (1, 2)
OPTIONS = {"groups": "flat", "zero_point": "float", "scale_dtype": "float32"}  # a version-1 file's (absent) options
SCALE_BLOBS = {"float32": "scales", "float16": "scales.float16", "bfloat16": "scales.bfloat16"}
MAX_METADATA = 16 << 20  # bytes of JSON; a model of thousands of tensors needs well under 1 MB


def _digest(meta: dict, tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256(json.dumps(meta, sort_keys=True).encode())
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_packed(model: nn.Module, spec: dict, path: str | Path, info: dict | None = None, overwrite: bool = False) -> Path:
    """Write `model` (with quantizers attached) packed; `spec` rebuilds its architecture, `info` is kept as is."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise QDistillError(f"{path} already exists; choose another name or pass overwrite")
    quantized = quantized_tensors(model)
    if not quantized:
        raise QDistillError("the model has no quantizers attached: nothing to pack (attach or train with a quantized method)")
    indices, points, zero_points, layout = [], [], [], []
    scales: dict[str, list[torch.Tensor]] = {}
    offsets = {"indices": 0, "points": 0, "zero_points": 0, **{blob: 0 for blob in SCALE_BLOBS.values()}}
    with torch.no_grad():
        for qt in quantized:
            q = qt.quantizer
            enc = q.encode(qt.shadow.detach())  # on the training device: the same indices as its forward
            packed = pack_bits(enc.indices, enc.index_bits)
            learned = isinstance(q, LearnedPointsQuantizer)
            params = enc.params
            zero = params.pop("zero", None)
            blob = SCALE_BLOBS[q.scale_dtype]
            entry = {
                "name": qt.name,
                "shape": list(qt.shadow.shape),
                "kind": "learned" if learned else "uniform",
                "index_bits": enc.index_bits,
                "bucket": q.bucket,
                "groups": q.groups,
                "zero_point": "float" if zero is None else "int",
                "scale_dtype": q.scale_dtype,
                "n_buckets": q.n_buckets(qt.shadow.shape),
                "n_points": int(enc.points.numel()),
                "indices": offsets["indices"],
                "scales": offsets[blob],
                "points": offsets["points"] if learned else None,
                "zero_points": None if zero is None else offsets["zero_points"],
            }
            layout.append({k: v for k, v in entry.items() if not (OPTIONS.get(k, ...) == v or (k == "zero_points" and v is None))})
            indices.append(torch.from_numpy(packed))
            stored = torch.cat(list(params.values())).cpu().to(SCALE_DTYPES[q.scale_dtype])  # exact: rounded so in training
            scales.setdefault(blob, []).append(stored)
            offsets["indices"] += packed.size
            offsets[blob] += stored.numel()
            if zero is not None:
                zero_points.append(zero.cpu().to(torch.uint8))
                offsets["zero_points"] += zero.numel()
            if learned:
                points.append(enc.points.float().cpu())
                offsets["points"] += entry["n_points"]
        tensors = {"indices": torch.cat(indices), **{blob: torch.cat(parts) for blob, parts in scales.items()}}
        if zero_points:
            tensors["zero_points"] = torch.cat(zero_points)
        if points:
            tensors["points"] = torch.cat(points)
        aliases = {use[0]: qt.name for qt in quantized for use in qt.tied}  # tied uses of a quantized tensor
        kept, by_dtype, first_name = [], {}, {}
        for name, t in model.state_dict(keep_vars=True).items():
            if "parametrizations" in name.split("."):  # the shadows and quantizer state: stored above
                continue
            if id(t) in first_name:  # a tensor shared by two modules is stored once
                aliases[name] = first_name[id(t)]
                continue
            first_name[id(t)] = name
            key = f"fp.{str(t.dtype).removeprefix('torch.')}"
            chunks = by_dtype.setdefault(key, [])
            kept.append({"name": name, "blob": key, "shape": list(t.shape), "offset": sum(c.numel() for c in chunks)})
            chunks.append(t.detach().cpu().reshape(-1))
        tensors.update({key: torch.cat(chunks) for key, chunks in by_dtype.items()})
    version = VERSION if any(k in e for e in layout for k in OPTIONS) else 1
    meta = {"format": FORMAT, "version": version, "spec": spec, "quantized": layout, "kept": kept, "aliases": aliases, "info": info or {}}
    meta["sha256"] = _digest(meta, tensors)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_safetensors({k: v.contiguous() for k, v in tensors.items()}, path, metadata={"qdistill": json.dumps(meta, separators=(",", ":"))})
    return path


def is_packed(path: str | Path) -> bool:
    """Whether `path` is a readable safetensors file carrying qdistill packed metadata."""
    try:
        with safe_open(str(path), "pt") as f:
            return json.loads((f.metadata() or {})["qdistill"])["format"] == FORMAT
    except Exception:  # not safetensors, no such key, or a full-precision checkpoint's metadata
        return False


def read_packed(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """Metadata and raw tensors, after checking the format, the checksum and the whole layout.

    Nothing in the file is trusted: every offset, count and shape is checked against the tensors
    before any is decoded (`check_layout`), so a damaged or crafted file fails here with a
    QDistillError instead of decoding to wrong weights or allocating what its metadata claims."""
    path = Path(path)
    if not path.exists():
        raise QDistillError(f"packed model {path} does not exist")
    try:
        with safe_open(str(path), "pt") as f:
            raw = (f.metadata() or {}).get("qdistill")
            if raw is None:
                raise QDistillError(f"{path} is a safetensors file but not a qdistill packed model")
            if len(raw) > MAX_METADATA:
                raise QDistillError(f"{path}: {len(raw):,} bytes of metadata, more than a packed model has (crafted file?)")
            meta = json.loads(raw)
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            if not isinstance(meta, dict) or meta.get("format") != FORMAT or type(meta.get("version")) is not int or meta["version"] not in READABLE:
                found = (meta.get("format"), meta.get("version")) if isinstance(meta, dict) else type(meta).__name__
                raise QDistillError(f"{path}: not a {FORMAT} file of version {' or '.join(map(str, READABLE))} (found {found}; a newer qdistill may read it)")
            intact = meta.get("sha256") == _digest({k: v for k, v in meta.items() if k != "sha256"}, tensors)
    except QDistillError:
        raise
    except Exception as e:  # RecursionError from deeply nested JSON included
        raise QDistillError(f"{path} is corrupt or truncated (cannot be read as a packed model: {type(e).__name__})") from None
    if not intact:
        raise QDistillError(f"{path} failed its checksum: the file was altered or damaged")
    check_layout(meta, tensors, path)
    return meta, tensors


def _int(value, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def check_layout(meta: dict, tensors: dict[str, torch.Tensor], path) -> None:
    """Raise QDistillError unless the metadata describes exactly the tensors that save_packed writes.

    Every quantized tensor's indices, scales and points must tile their blobs in order with nothing
    left over, every kept tensor must lie inside its blob, and names must be unique. A checksum
    proves nothing against an edit (whoever edits a file recomputes it); these checks do."""

    def bad(what: str):
        return QDistillError(f"{path}: damaged or crafted metadata ({what}); the file cannot be loaded safely")

    if not isinstance(meta.get("quantized"), list) or not meta["quantized"] or not isinstance(meta.get("kept"), list) or not isinstance(meta.get("info", {}), dict):
        raise bad("'quantized' must be a non-empty list, 'kept' a list")
    dtypes = {"indices": torch.uint8, "points": torch.float32, "zero_points": torch.uint8, **{b: SCALE_DTYPES[d] for d, b in SCALE_BLOBS.items()}}
    for key, dtype in dtypes.items():
        if key in tensors and (tensors[key].dtype != dtype or tensors[key].dim() != 1):
            raise bad(f"tensor {key!r} must be 1-d {dtype}")
    if "indices" not in tensors:
        raise bad("tensor 'indices' is missing")
    names, offsets = set(), dict.fromkeys(dtypes, 0)
    limit = tensors["indices"].numel() * 8  # no tensor can hold more weights than the file has index bits
    for e in meta["quantized"]:
        if not isinstance(e, dict) or not isinstance(e.get("name"), str) or e["name"] in names:
            raise bad("a quantized entry without a unique name")
        names.add(e["name"])
        shape = e.get("shape")
        if not isinstance(shape, list) or len(shape) > 8 or not all(_int(d, 0, limit) for d in shape):
            raise bad(f"{e['name']!r}: shape {shape!r}")
        count = math.prod(shape)
        bits, bucket = e.get("index_bits"), e.get("bucket")
        if not _int(bits, 1, 8) or count * bits > limit:
            raise bad(f"{e['name']!r}: {count} weights of {bits!r} bits")
        if not (bucket is None or _int(bucket, 1, limit)):
            raise bad(f"{e['name']!r}: bucket {bucket!r}")
        opts = options(e)
        if meta["version"] == 1 and any(k in e for k in OPTIONS):
            raise bad(f"{e['name']!r}: quantizer options in a version-1 file, which has none")
        if opts["groups"] not in GROUPS or opts["zero_point"] not in ZERO_POINTS or opts["scale_dtype"] not in tuple(SCALE_DTYPES):
            raise bad(f"{e['name']!r}: unknown quantizer options {opts!r}")
        n_buckets = n_groups(shape, bucket, opts["groups"])
        if e.get("kind") not in ("uniform", "learned") or not _int(e.get("n_buckets"), n_buckets, n_buckets) or count == 0:
            raise bad(f"{e['name']!r}: kind {e.get('kind')!r}, {e.get('n_buckets')!r} groups for {count} weights in {opts['groups']} groups of {bucket}")
        learned = e["kind"] == "learned"
        if learned and opts["zero_point"] != "float":
            raise bad(f"{e['name']!r}: learned points with an integer zero point")
        n_points = e.get("n_points")
        if not _int(n_points, 2 if learned else 2**bits, 2**bits):
            raise bad(f"{e['name']!r}: {n_points!r} points for {bits}-bit indices")
        for key, blob, span in entry_spans(e):  # each tensor's data follow the previous one's in each blob
            if not (_int(e.get(key), offsets[blob], offsets[blob]) if span else e.get(key) is None):
                raise bad(f"{e['name']!r}: {key} offset {e.get(key)!r}, expected {offsets[blob] if span else None}")
            offsets[blob] += span
    for key, used in offsets.items():
        size = tensors[key].numel() if key in tensors else 0
        if used != size:
            raise bad(f"the layout uses {used} values of {key!r}, the file holds {size}")
    used: dict[str, int] = {}
    for e in meta["kept"]:  # each blob holds its tensors one after the other, nothing left over
        if not isinstance(e, dict) or not isinstance(e.get("name"), str) or e["name"] in names:
            raise bad("a kept entry without a unique name")
        names.add(e["name"])
        blob, shape, offset = e.get("blob"), e.get("shape"), e.get("offset")
        if not isinstance(blob, str) or not blob.startswith("fp.") or blob not in tensors or tensors[blob].dim() != 1:
            raise bad(f"{e['name']!r}: blob {blob!r}")
        size, start = tensors[blob].numel(), used.get(blob, 0)
        if not isinstance(shape, list) or len(shape) > 8 or not all(_int(d, 0, size) for d in shape) or not _int(offset, start, start):
            raise bad(f"{e['name']!r}: shape {shape!r} at {offset!r}, expected at {start}")
        used[blob] = start + math.prod(shape)
        if used[blob] > size:
            raise bad(f"{e['name']!r}: {math.prod(shape)} values at {offset} overrun its blob of {size}")
    if any(used.get(k, 0) != t.numel() for k, t in tensors.items() if k.startswith("fp.")):
        raise bad("a full-precision blob holds values no tensor uses")
    for key, t in tensors.items():  # a blob is named by its dtype: values of another would be cast without a word
        if key.startswith("fp.") and f"fp.{str(t.dtype).removeprefix('torch.')}" != key:
            raise bad(f"blob {key!r} holds {str(t.dtype).removeprefix('torch.')} values")
    aliases = meta.get("aliases", {})
    if not isinstance(aliases, dict) or not all(isinstance(a, str) and a not in names and isinstance(target, str) and target in names for a, target in aliases.items()):
        raise bad("'aliases' must map new names to stored tensors")
    extra = set(tensors) - set(dtypes) - {e["blob"] for e in meta["kept"]}
    if extra:
        raise bad(f"unexplained tensors {sorted(extra)}")
    for key in ("points", *SCALE_BLOBS.values()):
        if key in tensors and not bool(torch.isfinite(tensors[key]).all()):
            raise bad(f"non-finite values in {key!r}")
    for e in meta["kept"]:
        check_finite(tensors[e["blob"]][e["offset"] : e["offset"] + math.prod(e["shape"])], e["name"], path)
    for e in meta["quantized"]:  # the layout holds: each tensor's stored values can be read
        params = entry_params(e, tensors)
        if "step" in params and not bool((params["step"] > 0).all()):
            raise bad(f"{e['name']!r}: a step that is not positive")
        if "zero" in params and int(params["zero"].max()) >= 2 ** e["index_bits"]:
            raise bad(f"{e['name']!r}: a zero point over {2 ** e['index_bits'] - 1}")
        last = 1.0 if "hi" in params else 2 ** e["index_bits"] - 1.0  # the range form's levels are points in [0, 1]
        ends = dequantize(torch.tensor([[0.0], [last]]), **{k: v.view(1, -1) for k, v in params.items()})
        if not bool(torch.isfinite(ends).all() and torch.isfinite(params.get("hi", ends) - params.get("lo", ends)).all()):
            raise bad(f"{e['name']!r}: stored values whose levels overflow float32")


def options(entry: dict) -> dict:
    """A quantized entry's groups, zero_point and scale_dtype (the defaults where a version-1 file has none)."""
    return {k: entry.get(k, default) for k, default in OPTIONS.items()}


def entry_spans(entry: dict) -> tuple[tuple[str, str, int], ...]:
    """Where a quantized tensor's data lie: (its offset's key, the blob, how many values) per blob; 0 values:
    a blob it does not use (offset null). Entries whose shape, bits, groups, kind and points were checked."""
    integer, learned, groups = options(entry)["zero_point"] == "int", entry["kind"] == "learned", entry["n_buckets"]
    return (
        ("indices", "indices", packed_bytes(math.prod(entry["shape"]), entry["index_bits"])),
        ("scales", SCALE_BLOBS[options(entry)["scale_dtype"]], groups * (1 if integer else 2)),
        ("points", "points", entry["n_points"] if learned else 0),
        ("zero_points", "zero_points", groups if integer else 0),
    )


def entry_form(entry: dict) -> str:
    opts = options(entry)
    return form(entry["kind"], opts["zero_point"], opts["scale_dtype"])


def entry_params(entry: dict, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each group's stored values (`FORMS`) in float32; entries come from a layout `check_layout` accepted."""
    name, nb, s = entry_form(entry), entry["n_buckets"], entry["scales"]
    blob = tensors[SCALE_BLOBS[options(entry)["scale_dtype"]]]
    stored = blob[s : s + nb * (1 if name == "int-zero" else 2)].float().view(-1, nb)
    params = dict(zip(FORMS[name], stored))  # int-zero: the step; its zero points are a blob of their own
    if name == "int-zero":
        params["zero"] = tensors["zero_points"][entry["zero_points"] : entry["zero_points"] + nb].float()
    return params


def group_step(entry: dict, params: dict[str, torch.Tensor]) -> torch.Tensor:
    """Each group's step between adjacent levels (`entry_params`' values): the stored step, or a range's max - min
    over its top level (2**b - 1 uniform levels; 1 for learned points, whose levels are points in [0, 1])."""
    if "step" in params:
        return params["step"]
    return (params["hi"] - params["lo"]) / (1 if entry["kind"] == "learned" else 2 ** entry["index_bits"] - 1)


def row_group(entry: dict) -> int | None:
    """The size of the groups along each row [out, in*...] when they tile the rows exactly, else None."""
    return row_group_size(entry["shape"], entry["bucket"], options(entry)["groups"])


def within_rows_group(entry: dict) -> int | None:
    """The size of the groups along each row [out, in*...] when no group spans two rows (`row_group`, or row
    groups whose last one in each row is shorter: they hold ceil(in / size) groups a row), else None."""
    if options(entry)["groups"] == "row":
        return min(entry["bucket"] or math.inf, math.prod(entry["shape"][1:]))
    return row_group(entry)


def entry_indices(entry: dict, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """The tensor's level indices, flat; entries come from a layout `check_layout` accepted.

    At 1, 2, 4 and 8 bits each byte holds whole indices (the lowest bits first, as `pack_bits` writes
    them): unpacked with shifts, in a byte per index before the int64 result instead of 8 per bit."""
    count, start, bits = math.prod(entry["shape"]), entry["indices"], entry["index_bits"]
    raw = tensors["indices"][start : start + packed_bytes(count, bits)]
    if 8 % bits:
        return unpack_bits(raw.numpy(), bits, count)
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8)
    return ((raw[:, None] >> shifts) & (2**bits - 1)).reshape(-1)[:count].long()


def checked_indices(entry: dict, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """`entry_indices`, refused if one names a point the entry does not have (a crafted file)."""
    idx = entry_indices(entry, tensors)
    if int(idx.max()) >= entry["n_points"]:
        raise QDistillError(f"{entry['name']}: a level index exceeds its {entry['n_points']} points (damaged or crafted file)")
    return idx


def decode_entry(entry: dict, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """The tensor's quantized values; entries come from a layout `check_layout` accepted."""
    idx = checked_indices(entry, tensors).view(entry["shape"])
    if entry["kind"] == "learned":
        points = tensors["points"][entry["points"] : entry["points"] + entry["n_points"]]
    else:
        points = torch.arange(entry["n_points"], dtype=torch.float32) / (entry["n_points"] - 1)
    groups, bucket = options(entry)["groups"], entry["bucket"]
    if bucket is not None and bucket >= row_view(entry["shape"], groups)[1]:
        bucket = None  # one group a row: no padding
    return Encoded(idx, points, entry["index_bits"], **entry_params(entry, tensors)).decode(entry["shape"], bucket, groups)


def stored_metadata_bytes(path: Path) -> int:
    """Bytes the metadata takes in the safetensors header (a JSON string inside JSON, so quotes are escaped)."""
    with open(path, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    return len(json.dumps(header["__metadata__"]["qdistill"]).encode())


def inspect_packed(path: str | Path) -> dict:
    """Sizes: fp32, on disk, the theoretical payload, the paper's nominal ratio and Huffman estimate.

    Both count what a file needs besides the indices: the nominal ratio each group's stored values and the float32
    codebook of learned points (as `Quantizer.size_bits`); the Huffman size every stored value and kept tensor,
    and the code's table: one 8-bit code length per symbol, 2**b symbols for the widest b (one code for all tensors)."""
    path = Path(path)
    meta, tensors = read_packed(path)
    meta_bytes = stored_metadata_bytes(path)
    q_numel = sum(math.prod(e["shape"]) for e in meta["quantized"])
    opts = [(e, options(e)) for e in meta["quantized"]]
    kept_bytes = sum(t.numel() * t.element_size() for k, t in tensors.items() if k.startswith("fp."))
    kept_numel = sum(math.prod(e["shape"]) for e in meta["kept"])
    index_bytes = sum(packed_bytes(math.prod(e["shape"]), e["index_bits"]) for e in meta["quantized"])
    side_bytes = sum(t.numel() * t.element_size() for k, t in tensors.items() if k != "indices" and not k.startswith("fp."))
    counts = np.zeros(256, dtype=np.int64)
    for e in meta["quantized"]:
        counts += np.bincount(entry_indices(e, tensors).numpy(), minlength=256)[:256]
    huffman_bits = mean_code_length(counts)
    fp32 = 4 * (q_numel + kept_numel)
    theoretical = index_bytes + side_bytes + kept_bytes + meta_bytes
    nominal_bits = sum(
        math.prod(e["shape"]) * e["index_bits"]
        + group_bits(entry_form(e), o["scale_dtype"]) * e["n_buckets"]
        + 32 * e["n_points"] * (e["kind"] == "learned")  # the float32 codebook
        for e, o in opts
    )
    code_table = table_bits(2 ** max(e["index_bits"] for e in meta["quantized"]))
    huffman_bytes = math.ceil((q_numel * huffman_bits + code_table) / 8) + side_bytes + kept_bytes
    disk = path.stat().st_size
    return {
        "file": str(path),
        "quantized_tensors": len(meta["quantized"]),
        "quantized_weights": q_numel,
        "kept_values": kept_numel,
        "index_bits": sorted({e["index_bits"] for e in meta["quantized"]}),
        "buckets": sorted({str(e["bucket"]) for e in meta["quantized"]}),
        "groups": sorted({o["groups"] for _, o in opts}),
        "zero_points": sorted({o["zero_point"] for _, o in opts}),
        "scale_dtypes": sorted({o["scale_dtype"] for _, o in opts}),
        "kernel_ready_tensors": sum(kernel_ready(e["shape"], e["bucket"], o["groups"]) for e, o in opts),  # groups tile every row
        "fp32_bytes": fp32,
        "disk_bytes": disk,
        "theoretical_bytes": theoretical,
        "overhead_pct": 100.0 * (disk - theoretical) / theoretical,
        "ratio_vs_fp32": fp32 / disk,
        "nominal_ratio_quantized": 32 * q_numel / nominal_bits,
        "huffman_bits_per_weight": huffman_bits,
        "huffman_bytes": huffman_bytes,
        "huffman_ratio_vs_fp32": fp32 / huffman_bytes,
        "info": meta.get("info", {}),
    }
