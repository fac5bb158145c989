"""CIFAR-10 (python batches) as labelled records, read without unpickling code.

The five data batches become split "train", test_batch becomes split "val". The data root
is a local path or a URI (pipeline.storage).
"""

from __future__ import annotations

import io
import pickle

import numpy as np

from pipeline.data.records import Catalog, Record
from pipeline.storage import is_file, join, read_bytes

CIFAR_DIR = "cifar-10-batches-py"
CIFAR_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST_BATCH = "test_batch"
CIFAR_SIDE = 32


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler refusing every global except the three numpy arrays need.

    The CIFAR batches are dicts of bytes, lists and one ndarray. Unpickling an ndarray
    calls `numpy.core.multiarray._reconstruct(numpy.ndarray, shape, dtype)` and then
    `numpy.dtype(...)`; those build plain arrays and run no user code, so they are the
    only callables allowed. Python-2 pickles (the official files) name the module
    numpy.core, numpy >= 2 pickles numpy._core: both map to the current objects.
    """

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): np._core.multiarray._reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): np._core.multiarray._reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }

    def find_class(self, module: str, name: str) -> object:
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing global {module}.{name}") from None


def _load_cifar_batch(uri: str) -> dict[bytes, object]:
    # encoding="bytes": the official batches are Python-2 pickles of str keys.
    try:
        return _NumpyOnlyUnpickler(io.BytesIO(read_bytes(uri)), encoding="bytes").load()
    except pickle.UnpicklingError as e:
        raise pickle.UnpicklingError(f"{uri}: {e}") from None


def ingest_cifar10(root: str) -> Catalog:
    """Lists CIFAR-10 (python batches) as records carrying their pixels.

    The five data batches become split "train", test_batch becomes split "val".
    Keys are `cifar_<split>_<5-digit 1-based index>`; the wnid-equivalent is the
    class name from batches.meta. The pixels travel in the records (60,000 x 3 KiB).

    Args:
        root: Local path or URI of `cifar-10-batches-py/` or of its parent.

    Returns:
        The catalog; classes and names are both the class names in label order.

    Raises:
        FileNotFoundError: a batch file is missing.
        pickle.UnpicklingError: a batch references anything but numpy arrays (names the
            file and the global).
    """
    if not is_file(join(root, "batches.meta")):
        root = join(root, CIFAR_DIR)
    names = [n.decode() for n in _load_cifar_batch(join(root, "batches.meta"))[b"label_names"]]
    records = []
    for split, batches in (("train", CIFAR_TRAIN_BATCHES), ("val", (CIFAR_TEST_BATCH,))):
        index = 0
        for batch_name in batches:
            uri = join(root, batch_name)
            batch = _load_cifar_batch(uri)
            # (N, 3072) uint8, channel-major rows -> (N, 32, 32, 3)
            pixels = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, CIFAR_SIDE, CIFAR_SIDE)
            pixels = pixels.transpose(0, 2, 3, 1)
            for row, label in enumerate(batch[b"labels"]):
                index += 1
                records.append(
                    Record(
                        split,
                        f"{uri}#{row}",
                        int(label),
                        names[label],
                        f"cifar_{split}_{index:05d}",
                        np.ascontiguousarray(pixels[row]),
                    )
                )
    return Catalog(records, names, list(names))
