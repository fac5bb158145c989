"""ILSVRC-2012's label files, parsed from their bytes (files of a tree or archive members).

- LOC_val_solution.csv (Kaggle): `ImageId,PredictionString`, the string being
  "wnid x0 y0 x1 y1" once per box; the first wnid is the image's class.
- LOC_synset_mapping.txt (Kaggle): "wnid name, name, ..." per line.
- The devkit's meta.mat (a struct array `synsets` with ILSVRC2012_ID, WNID, words) and
  ILSVRC2012_validation_ground_truth.txt (line i: the ILSVRC2012_ID of the class of
  ILSVRC2012_val_<i, 8 digits>).

Every error names the file, and the line where there is one: `ValueError("<file>:<line>: ...")`.
"""

from __future__ import annotations

import csv
import io

import numpy as np
import scipy.io
from scipy.io.matlab import MatReadError

_SOLUTION_HEADER = ("ImageId", "PredictionString")


def _text(data: bytes, file: str, encoding: str) -> str:
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise ValueError(f"{file}:{line}: not {encoding} text ({err.reason})") from None


def parse_val_solution(data: bytes, file: str) -> dict[str, str]:
    """Kaggle's LOC_val_solution.csv: {ImageId: wnid of its first box}.

    Raises:
        ValueError: A missing header, a line without both fields, an empty
            PredictionString, or an ImageId listed twice ("<file>:<line>: ...").
    """
    reader = csv.reader(io.StringIO(_text(data, file, "utf-8"), newline=""))
    header = next(reader, None)
    if header is None or not set(_SOLUTION_HEADER) <= set(header):
        raise ValueError(f"{file}:1: expected the header {','.join(_SOLUTION_HEADER)}, got {header}")
    id_col, prediction_col = (header.index(name) for name in _SOLUTION_HEADER)
    labels: dict[str, str] = {}
    line_of: dict[str, int] = {}
    for row in reader:
        line = reader.line_num
        if len(row) != len(header):
            raise ValueError(f"{file}:{line}: expected {len(header)} fields ({','.join(header)}), got {row}")
        image_id, tokens = row[id_col].strip(), row[prediction_col].split()
        if not image_id or not tokens:
            expected = "an ImageId and a PredictionString 'wnid x0 y0 x1 y1 ...'"
            raise ValueError(f"{file}:{line}: expected {expected}, got {row}")
        if image_id in labels:
            raise ValueError(f"{file}:{line}: ImageId {image_id} already on line {line_of[image_id]}")
        labels[image_id], line_of[image_id] = tokens[0], line
    return labels


def parse_synset_mapping(data: bytes, file: str) -> dict[str, str]:
    """LOC_synset_mapping.txt: {wnid: names} in file order (names default to the wnid).

    Raises:
        ValueError: An empty line or a wnid listed twice ("<file>:<line>: ...").
    """
    names: dict[str, str] = {}
    line_of: dict[str, int] = {}
    for line, text in enumerate(_text(data, file, "utf-8").splitlines(), start=1):
        wnid, _, name = text.strip().partition(" ")
        if not wnid:
            raise ValueError(f"{file}:{line}: expected 'wnid name, name, ...', got an empty line")
        if wnid in names:
            raise ValueError(f"{file}:{line}: wnid {wnid} already listed on line {line_of[wnid]}")
        names[wnid], line_of[wnid] = name.strip() or wnid, line
    return names


def parse_meta_mat(data: bytes, file: str) -> tuple[dict[int, str], dict[str, str]]:
    """The devkit's meta.mat: ({ILSVRC2012_ID: wnid}, {wnid: words}) over every synset.

    Raises:
        ValueError: Not a MAT file holding a `synsets` struct array with the fields
            ILSVRC2012_ID and WNID.
    """
    try:
        synsets = scipy.io.loadmat(io.BytesIO(data), squeeze_me=True)["synsets"]
        ids, wnids = np.atleast_1d(synsets["ILSVRC2012_ID"]), np.atleast_1d(synsets["WNID"])
        words = np.atleast_1d(synsets["words"]) if "words" in synsets.dtype.names else wnids
        wnid_of_id = {int(i): str(w) for i, w in zip(ids, wnids, strict=True)}
    except (MatReadError, ValueError, TypeError, KeyError, IndexError) as err:
        raise ValueError(
            f"{file}: expected the devkit's meta.mat (a struct array 'synsets' with fields "
            f"ILSVRC2012_ID, WNID, words): {type(err).__name__}: {err}"
        ) from None
    return wnid_of_id, {str(w): str(n) for w, n in zip(wnids, words, strict=True)}


def parse_ground_truth(data: bytes, file: str, wnid_of_id: dict[int, str], meta_file: str) -> dict[str, str]:
    """ILSVRC2012_validation_ground_truth.txt: {"ILSVRC2012_val_<8 digits>": wnid}.

    Args:
        data: The file's bytes.
        file: Its path or URI, for errors.
        wnid_of_id: {ILSVRC2012_ID: wnid} from `parse_meta_mat`.
        meta_file: The meta.mat it came from, for errors.

    Raises:
        ValueError: A line that is not a positive integer, or an ID meta.mat lacks
            ("<file>:<line>: ...").
    """
    labels = {}
    for line, text in enumerate(_text(data, file, "ascii").splitlines(), start=1):
        token = text.strip()
        if not token.isdigit():
            raise ValueError(f"{file}:{line}: expected an ILSVRC2012_ID (a positive integer), got {text!r}")
        if int(token) not in wnid_of_id:
            raise ValueError(f"{file}:{line}: ILSVRC2012_ID {token} is not in {meta_file}")
        labels[f"ILSVRC2012_val_{line:08d}"] = wnid_of_id[int(token)]
    return labels
