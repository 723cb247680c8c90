"""The packed file format: what a file holds, how it is written, checked and decoded, and its sizes.
Imports nothing from `qdistill.runtime` or `qdistill.export`, which build on it."""

from qdistill.format.packed import (
    FORMAT,
    VERSION,
    check_layout,
    decode_entry,
    entry_indices,
    entry_params,
    group_step,
    inspect_packed,
    is_packed,
    options,
    read_packed,
    row_group,
    save_packed,
)

__all__ = [
    "FORMAT",
    "VERSION",
    "check_layout",
    "decode_entry",
    "entry_indices",
    "entry_params",
    "group_step",
    "inspect_packed",
    "is_packed",
    "options",
    "read_packed",
    "row_group",
    "save_packed",
]
