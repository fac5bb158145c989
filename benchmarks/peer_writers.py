"""The peers' shard writers, run in the peers' venv (benchmarks/peers_env.py) by peers_write.py.

Each writer turns the same inputs into its own shard format with our per-image function
(`sample`: read the file, `preprocess_image`, the columns of our Parquet shards) on
`workers` processes. Each returns {"seconds", "cpu", "written"}: its own elapsed seconds,
timed from when its processes can start work (torch and the peer imported, pools up) to
when its output is complete, the CPU seconds all its processes spent meanwhile, and the
number of samples its index lists.
"""

from __future__ import annotations

import functools
import json
import multiprocessing
import shutil
import time
from typing import Any

from benchmarks.peers_env import cpu_seconds
from pipeline.data.preprocess import Processed, preprocess_image

# Our Parquet shards' columns, in MosaicML's encodings.
MDS_COLUMNS = {
    "key": "str",
    "label": "int",
    "wnid": "str",
    "jpeg": "bytes",
    "height": "int",
    "width": "int",
    "src_height": "int",
    "src_width": "int",
}
# Both peers' documented default shard size (their benchmarks' corpus fits one shard
# per worker at 64 MB: ~9 MB per 250 images at 256 px).
SHARD_BYTES = 1 << 26


def sample(item: list[Any], size: int, quality: int) -> dict[str, Any]:
    """Our per-image work for one input [key, label, wnid, path]: one row of our shards."""
    key, label, wnid, path = item
    with open(path, "rb") as f:
        out = preprocess_image(f.read(), size=size, quality=quality)
    if not isinstance(out, Processed):  # the benchmark corpus has no bad files
        raise ValueError(f"{path}: {out.reason}")
    return {
        "key": key,
        "label": label,
        "wnid": wnid,
        "jpeg": out.jpeg,
        "height": out.height,
        "width": out.width,
        "src_height": out.src_height,
        "src_width": out.src_width,
    }


def litdata_write(items: list[list[Any]], out: str, workers: int, size: int, quality: int) -> dict[str, Any]:
    """Lightning's `optimize()` with forked workers (they inherit the imports)."""
    from litdata import optimize

    shutil.rmtree(out, ignore_errors=True)
    cpu, start = cpu_seconds(), time.perf_counter()
    optimize(
        fn=functools.partial(sample, size=size, quality=quality),
        inputs=items,
        output_dir=out,
        num_workers=workers,
        chunk_bytes=SHARD_BYTES,
        start_method="fork",
        mode="overwrite",
        verbose=False,
    )
    seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    with open(f"{out}/index.json") as f:
        written = sum(chunk["chunk_size"] for chunk in json.load(f)["chunks"])
    return {"seconds": seconds, "cpu": cpu, "written": written}


def _mds_part(part: int, items: list[list[Any]], out: str, size: int, quality: int) -> None:
    """One process's share: an MDSWriter over a contiguous slice into out/<part>/."""
    from streaming import MDSWriter

    with MDSWriter(out=f"{out}/{part}", columns=MDS_COLUMNS, size_limit=SHARD_BYTES) as writer:
        for item in items:
            writer.write(sample(item, size, quality))


def mds_write(items: list[list[Any]], out: str, workers: int, size: int, quality: int) -> dict[str, Any]:
    """MosaicML's `MDSWriter` in `workers` processes, one contiguous slice each, then `merge_index`.

    The processes are forked and have run a task before the clock starts.
    """
    from streaming.base.util import merge_index

    shutil.rmtree(out, ignore_errors=True)
    per = -(-len(items) // workers)
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        pool.map(abs, range(workers))  # processes up
        cpu, start = cpu_seconds(), time.perf_counter()
        args = [(i, items[i * per : (i + 1) * per], out, size, quality) for i in range(workers)]
        pool.starmap(_mds_part, args)
        merge_index(out, keep_local=True)
        seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    with open(f"{out}/index.json") as f:
        written = sum(shard["samples"] for shard in json.load(f)["shards"])
    return {"seconds": seconds, "cpu": cpu, "written": written}
