"""Checks a shard output against its meta.json: every shard file present, of the length and
SHA-256 the shard stage recorded.

    python -m cli.verify                     # data.shards of params.yaml
    python -m cli.verify --shards PATH_OR_URI [--quick]

Exit status 0 when every file is as written, 1 otherwise (each bad file is printed with
what is wrong), 2 when there is no complete shard output to check.
"""

from __future__ import annotations

import argparse
import sys
import time

from pipeline.config import load_params_or_exit
from pipeline.data.shards import ShardMeta, check_shard_files


def main(argv: list[str] | None = None) -> int:
    """Verifies the shard output named on the command line or by params.yaml."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", help="shard output folder or URI (default: data.shards of params.yaml)")
    parser.add_argument("--quick", action="store_true", help="compare lengths only, do not read the files")
    args = parser.parse_args(argv)
    root = args.shards or load_params_or_exit().data.shards
    try:
        meta = ShardMeta.read(root)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    began = time.monotonic()
    files = [f for fmt in meta.shards for f in meta.shard_files(fmt)]
    problems = check_shard_files(meta, full=not args.quick)
    for problem in problems:
        print(f"BAD  {problem}")
    what = "lengths" if args.quick else "SHA-256"
    gib = sum(f.nbytes for f in files) / 2**30
    print(
        f"{len(files) - len(problems)} of {len(files)} shard files ({gib:.2f} GiB) match meta.json's {what} "
        f"({meta.root}, {time.monotonic() - began:.1f} s)"
    )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
