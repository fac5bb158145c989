"""DVC stage `shard`: ImageNet (tree or archives) or CIFAR-10 -> resized Parquet/WebDataset shards on Ray."""

import json

from pipeline.cluster import init_ray
from pipeline.config import load_params_or_exit
from pipeline.data.cifar import ingest_cifar10
from pipeline.data.imagenet import ingest_imagenet
from pipeline.data.shard_writer import warm_workers, write_shards
from pipeline.preflight import check_storage
from pipeline.storage import atomic_write_text, exit_when_out_of_space


def main() -> None:
    """Ingests data.raw and writes data.shards plus the shard metrics."""
    params = load_params_or_exit()
    data, s = params.data, params.shard
    check_storage({"data.raw": data.raw, "data.shards": data.shards, "data.shard_store": data.shard_store})
    init_ray()
    warm_workers()  # the workers import torch while the driver lists data.raw
    catalog = (ingest_imagenet if s.source == "imagenet" else ingest_cifar10)(data.raw)
    metrics = write_shards(
        catalog.records,
        data.shards,
        classes=catalog.classes,
        names=catalog.names,
        settings=s,
        quarantined=catalog.quarantine,
        store=data.shard_store,
    )
    atomic_write_text(data.shard_metrics, json.dumps(metrics, indent=1))
    counts = ", ".join(f"{split} {n}" for split, n in metrics["sharded"].items())
    bad = sum(metrics["quarantined"].values())
    print(f"shard: {counts} images sharded, {bad} quarantined -> {data.shards} ({data.shard_metrics})")


if __name__ == "__main__":
    with exit_when_out_of_space():
        main()
