"""The per-image function of the shard stage: any input image -> a size x size RGB JPEG.

The paper's preprocessing (spec, "Data"): rescale so the shorter side is `size`, then
crop the central size x size square. Here both happen in one resampling pass over
only the central square of the source, after letting libjpeg downscale in the DCT
domain (`Image.draft`) whenever the result still has a shorter side >= `size`.
EXIF orientation is ignored, as in torchvision and the reference recipes.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

DEFAULT_SIZE = 256
DEFAULT_QUALITY = 90
# Antialiased in Pillow (the filter support scales with the reduction factor), and the
# filter torchvision's Resize uses on PIL images.
RESAMPLE = Image.Resampling.BILINEAR


@dataclass(frozen=True)
class Processed:
    """A successfully preprocessed image.

    Attributes:
        jpeg: The encoded size x size RGB JPEG.
        height: Height of the stored image in pixels.
        width: Width of the stored image in pixels.
        src_height: Height of the original image in pixels.
        src_width: Width of the original image in pixels.
    """

    jpeg: bytes
    height: int
    width: int
    src_height: int
    src_width: int


@dataclass(frozen=True)
class Rejected:
    """An input that cannot be used; it goes to the quarantine report.

    Attributes:
        reason: One line saying what is wrong, e.g. "truncated image: ...".
    """

    reason: str


def preprocess_image(
    data: bytes | np.ndarray, *, size: int = DEFAULT_SIZE, quality: int = DEFAULT_QUALITY
) -> Processed | Rejected:
    """Turns one encoded image (or raw pixels) into a size x size RGB JPEG.

    Accepts whatever Pillow can decode, whatever the file is called (a PNG under a
    .JPEG name is decoded as PNG): CMYK (Adobe-inverted included), greyscale,
    palette, progressive JPEGs all become RGB.

    Args:
        data: The file's bytes, or an (H, W, 3) uint8 RGB array (CIFAR).
        size: Side of the output square in pixels.
        quality: JPEG quality of the output (1-95).

    Returns:
        `Processed` on success; `Rejected` with a reason for empty, truncated,
        corrupt or non-image input (never raises for bad input).
    """
    if isinstance(data, np.ndarray):
        return _resize_crop_encode(Image.fromarray(data), data.shape[:2], size, quality)
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        # Someone in this process turned Pillow's padding of short files on; truncated
        # inputs would then pass silently.
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES must be False")
    if len(data) == 0:
        return Rejected("empty file (0 bytes)")
    try:
        img = Image.open(io.BytesIO(data))
        src_hw = (img.height, img.width)
        short = min(img.size)
        # Largest DCT-domain reduction (1/2, 1/4, 1/8) keeping the short side >= size;
        # a no-op for non-JPEG formats.
        img.draft("RGB", (img.width * size // short, img.height * size // short))
        # load() is where truncation surfaces: a short file raises instead of being
        # padded with grey (LOAD_TRUNCATED_IMAGES is False, checked above).
        img.load()
        return _resize_crop_encode(img, src_hw, size, quality)
    except UnidentifiedImageError:
        # Its message names the BytesIO's address, which would make reports differ.
        return Rejected("not an image: no Pillow decoder recognises the bytes")
    # Pillow's decoders raise a zoo of types on malformed input (OSError, SyntaxError,
    # ValueError, EOFError, struct.error, DecompressionBombError...); all mean "bad file".
    # A bug that rejected everything would still surface through max_bad_fraction.
    except Exception as err:  # noqa: BLE001
        kind = "truncated image" if "truncated" in str(err) else "corrupt image"
        return Rejected(f"{kind}: {type(err).__name__}: {err}")


def _resize_crop_encode(
    img: Image.Image, src_hw: tuple[int, int], size: int, quality: int
) -> Processed:
    """Resamples the central square of `img` to size x size and encodes it as JPEG."""
    if img.mode != "RGB":
        # CMYK -> RGB before resampling, since the conversion is not linear.
        img = img.convert("RGB")
    w, h = img.size
    short = min(w, h)
    # The centred short x short square is exactly what survives "short side -> size,
    # then centre crop": resampling only it does the same work on fewer pixels. The
    # filter still reads source pixels just outside the box, like a full resize.
    left, top = (w - short) / 2, (h - short) / 2
    out = img.resize((size, size), RESAMPLE, box=(left, top, left + short, top + short))
    buf = io.BytesIO()
    out.save(buf, "JPEG", quality=quality)
    return Processed(buf.getvalue(), size, size, src_hw[0], src_hw[1])


def decode_jpeg(data: bytes) -> np.ndarray:
    """Decodes a stored image to pixels.

    Args:
        data: Encoded image bytes (the `jpeg` column / `.jpg` member of a shard).

    Returns:
        (H, W, 3) uint8 RGB array.
    """
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"))
