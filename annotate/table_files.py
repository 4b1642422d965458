"""Arrow tables to files people load elsewhere: Parquet or JSON Lines, atomically.

    write_table(table, "prefs.parquet")            # or .jsonl / .json, chosen by the suffix
    write_table(iter_of_tables, "prefs.parquet")   # slices of one schema, in order

A reader never sees half a file (temporary name, then rename), and
`datasets.load_dataset("parquet" | "json", data_files=path)` reads either kind. JSON
Lines are assembled with Arrow string kernels over whole columns, never a Python loop
per row, so a million preference rows write in seconds. Used by `preflab export` and
the dashboard's export.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

SUFFIXES = {".parquet": "parquet", ".jsonl": "json", ".json": "json"}


def output_kind(path: str | os.PathLike) -> str:
    """ "parquet" or "json" from the file extension; anything else is refused up front."""
    suffix = Path(path).suffix.lower()
    if suffix not in SUFFIXES:
        raise ValueError(
            f"{path}: unknown output type {suffix or '(no extension)'!r}; use one of {', '.join(SUFFIXES)}"
        )
    return SUFFIXES[suffix]


def ties_path_for(path: str | os.PathLike) -> Path:
    """out.parquet -> out.ties.parquet (same directory, same type)."""
    p = Path(path)
    return p.with_name(f"{p.stem}.ties{p.suffix}")


def _json_scalars(values: pa.Array) -> pa.Array:
    """JSON text of each value of a flat (non-nested) array.

    One json.dumps call over the whole column, with a newline as the item separator:
    JSON escapes every newline inside a string, so splitting on it gives back exactly
    one encoded value per row. Repeated strings (roles, a prompt voted on many times)
    are encoded once and gathered with a take.
    """
    if len(values) == 0:
        return pa.array([], pa.string())
    if pa.types.is_string(values.type) and not values.null_count:
        encoded = values.dictionary_encode()
        if len(encoded.dictionary) <= len(values) // 2:
            return _json_scalars(encoded.dictionary).take(encoded.indices)
    items = values.to_pylist()
    try:
        import orjson  # comes with gradio; several times faster than json
    except ImportError:
        text = json.dumps(items, ensure_ascii=False, separators=("\n", ":"))
        return pa.array(text[1:-1].split("\n"), pa.string())
    # Indented, each item is one line "  <json>,": the split and the slice happen in
    # Arrow. The trailing None gives the last real item its comma too.
    raw = orjson.dumps(items + [None], option=orjson.OPT_INDENT_2)
    lines = pc.split_pattern(pa.array([raw], pa.large_binary()), "\n").flatten().slice(1, len(items))
    return pc.binary_slice(lines, 2, -1).cast(pa.large_string()).cast(pa.string())


def _json_parts(values: pa.Array) -> list:
    """The JSON text of each value as a list of parts, strings or arrays aligned with
    `values`, to be joined element-wise: structs and one-item lists (every chosen /
    rejected turn) stay parts, so a whole line is assembled in one string join; other
    lists are joined per list with Arrow. No Python loop runs per row."""
    t = values.type
    if pa.types.is_struct(t):
        parts: list = ["{"]
        # StructArray.flatten (unlike .field) honours the offset of a sliced array.
        for i, (f, child) in enumerate(zip(t, values.flatten())):
            parts += [("," if i else "") + json.dumps(f.name) + ":", *_json_parts(child)]
        parts.append("}")
    elif pa.types.is_list(t) or pa.types.is_large_list(t):
        items = _json_parts(values.flatten())
        if (
            len(values)
            and not values.null_count
            and pc.all(pc.equal(pc.list_value_length(values), 1)).as_py()
        ):
            return ["[", *items, "]"]
        offsets = pc.subtract(values.offsets, values.offsets[0])
        items = pc.binary_join_element_wise(*items, "") if len(items) > 1 else items[0]
        parts = ["[", pc.binary_join(pa.ListArray.from_arrays(offsets, items), ","), "]"]
    else:
        return [_json_scalars(values)]
    if values.null_count:
        text = pc.binary_join_element_wise(*parts, "")
        return [pc.if_else(pc.is_null(values), "null", text)]
    return parts


def _write_jsonl(table: pa.Table, f, batch_rows: int = 100_000) -> None:
    keys = [json.dumps(name) + ":" for name in table.column_names]
    for batch in table.to_batches(max_chunksize=batch_rows):
        if not batch.num_rows:
            continue
        parts: list = []
        for i, key in enumerate(keys):
            parts += [("{" if i == 0 else ",") + key, *_json_parts(batch.column(i))]
        lines = pc.binary_join_element_wise(*parts, "}\n", "")
        # The lines lie end to end in the array's data buffer: write that directly.
        _, offsets, data = lines.buffers()
        offsets = np.frombuffer(offsets, np.int32)[lines.offset : lines.offset + len(lines) + 1]
        f.write(memoryview(data)[offsets[0] : offsets[-1]])


# Exports are written with snappy, the codec pyarrow, pandas and `datasets` write by
# default: about 2x faster to write than zstd here, for files about 1.45x larger (1M
# votes of bench/store.py: 2.2 s / 382 MB against 4.8 s / 261 MB). The store's own part
# files stay zstd.
EXPORT_COMPRESSION = "snappy"
COMPRESSIONS = ("snappy", "zstd", "lz4", "gzip", "none")


def _ahead(tables: Iterable[pa.Table], depth: int = 2) -> Iterator[pa.Table]:
    """The same tables, produced in a background thread up to `depth` ahead: pyarrow
    releases the GIL, so on two cores one slice is gathered while the last is written."""
    import queue
    import threading

    done = object()
    box: queue.Queue = queue.Queue(maxsize=depth)

    def produce():
        try:
            for t in tables:
                box.put(t)
            box.put(done)
        except BaseException as e:  # handed to the consumer, raised there
            box.put(e)

    threading.Thread(target=produce, daemon=True, name="preflab-export").start()
    while (item := box.get()) is not done:
        if isinstance(item, BaseException):
            raise item
        yield item


SLICE_ROWS = 100_000  # preference rows gathered (and written as one row group) at a time


def write_table(
    table: pa.Table | Iterable[pa.Table], path: str | os.PathLike, compression: str = EXPORT_COMPRESSION
) -> Path:
    """Write `table` (or tables of one schema, in order) as Parquet (.parquet) or JSON
    Lines (.jsonl, .json), chosen by the extension, atomically (temporary name, then
    rename): a reader never sees half a file. `datasets.load_dataset("parquet" | "json",
    data_files=path)` reads either."""
    import pyarrow.parquet as pq

    path = Path(path)
    kind = output_kind(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tables = [table] if isinstance(table, pa.Table) else _ahead(table)
    try:
        # 0600: an export holds every vote (prompts, answers, annotators); whoever
        # shares it chmods it
        with open(tmp, "wb", opener=lambda name, flags: os.open(name, flags, 0o600)) as f:
            writer = None
            for t in tables:
                if kind != "parquet":
                    _write_jsonl(t, f)
                    continue
                if writer is None:
                    writer = pq.ParquetWriter(f, t.schema, compression=compression)
                writer.write_table(t)
            if writer is not None:
                writer.close()
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
