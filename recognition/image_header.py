"""Image sizes read from the encoded header, before any pixel is decoded (decompression-bomb checks).

A 285 KB PNG can declare 10000x10000 pixels and cost 300 MB once decoded: every tool that decodes images from an
untrusted source (the face service, ``.bin`` readers) asks :func:`check_image` first. Pillow reads only the header
here (``Image.open`` is lazy); the decoding itself stays with OpenCV/MXNet.
"""
from __future__ import annotations

import io
import re
import warnings
from typing import Optional, Tuple

from recognition.common import ToolkitError

MAX_IMAGE_PIXELS = 4096 * 4096  # width x height accepted from an untrusted image (a 12-megapixel photo passes)
MAX_IMAGE_BYTES = 16 * 2 ** 20  # encoded size of one image


class ImageTooLarge(ToolkitError):
    """An image over a stated byte or pixel limit (the service answers 413)."""


def header_size(raw: bytes) -> Optional[Tuple[int, int, str]]:
    """``(width, height, format)`` from the header of encoded image bytes, or ``None`` when Pillow does not know the
    format (the decoder then says what is wrong). Nothing is decoded."""
    from PIL import Image, UnidentifiedImageError

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow's DecompressionBombWarning: the caller applies its own limit
        try:
            with Image.open(io.BytesIO(raw)) as im:
                return int(im.size[0]), int(im.size[1]), str(im.format)
        except Image.DecompressionBombError as exc:  # > 2x Pillow's own limit: still only a header was read
            m = re.search(r"\((\d+) pixels\)", str(exc))
            return (int(m.group(1)) if m else 2 ** 31), 1, "?"
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
            return None


def check_image(raw: bytes, where: str, max_bytes: int = MAX_IMAGE_BYTES,
                max_pixels: int = MAX_IMAGE_PIXELS) -> Optional[Tuple[int, int, str]]:
    """Refuse ``raw`` (one line naming ``where``) when it is over ``max_bytes`` encoded or its header declares more
    than ``max_pixels``; returns :func:`header_size`'s answer."""
    if len(raw) > max_bytes:
        raise ImageTooLarge(f"{where}: image of {len(raw)} bytes exceeds the limit of {max_bytes} bytes")
    size = header_size(raw)
    if size is not None and size[0] * size[1] > max_pixels:
        dims = f"{size[0]}x{size[1]} pixels ({size[0] * size[1]})" if size[2] != "?" else f"{size[0]} pixels"
        raise ImageTooLarge(f"{where}: image declares {dims}, over the limit of {max_pixels}; nothing was decoded")
    return size
