"""insightface verification ``NAME.bin`` files: a restricted, bounded unpickler and an atomic writer.

A ``.bin`` is a pickle of ``(list_of_encoded_images, issame_list)``, pairs consecutive. A pickle runs code when
loaded, so only bytes, arrays, lists, tuples, bools and ints can come out of :func:`safe_load_pickle`; and a pickle
can ask for huge allocations from a few bytes, so what it builds is bounded: arrays it allocates are charged against
the file's own size, the loaded object is walked as a consumer sees it (memo references counted at every use), and
every image is checked against a byte and a pixel limit read from its header before anything decodes it.
"""
from __future__ import annotations

import os
import pickle
from typing import Iterable, List, Tuple

import numpy as np

from recognition.common import ToolkitError, atomic_write
from recognition.image_header import MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS, check_image


def _latin1_encode(text, encoding="latin1"):
    """Python 3 writes ``bytes`` in protocol-2 pickles as ``_codecs.encode(str, 'latin1')``: allow only that."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("_codecs.encode is only allowed as encode(str, 'latin1')")
    return text.encode("latin1")


def _safe_dtype(spec, align=False, copy=False):
    """``numpy.dtype`` restricted to plain numeric/bool dtypes (no object arrays: those unpickle arbitrary globals)."""
    dt = np.dtype(spec)
    if dt.kind not in "biuf" or dt.hasobject:
        raise pickle.UnpicklingError(f"numpy dtype {dt} is not allowed")
    return dt


# Bounds on what a .bin may make the loader build: an 82-byte pickle can declare a 500 MB array, and memo references
# let one object appear many times (each use is paid again by whoever converts or writes it).
BIN_ALLOC_SLACK = 16 * 2 ** 20  # bytes allocated beyond the file's own size (headers, small arrays)
BIN_MAX_ITEMS = 10_000_000  # list/tuple elements visited, memo references counted each time
BIN_MAX_DEPTH = 6  # an insightface .bin is (list, list): nothing nests deeper than a few levels


def _prod(shape) -> int:
    if isinstance(shape, int):
        shape = (shape,)
    if not isinstance(shape, (tuple, list)) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise pickle.UnpicklingError(f"array shape {shape!r} is not a tuple of non-negative ints")
    n = 1
    for d in shape:
        n *= d
    return n


def _safe_reconstruct(charge, cls, shape, dtype_code):
    """``numpy.core.multiarray._reconstruct`` for plain ``ndarray`` only (the array data follows in BUILD)."""
    if cls is not np.ndarray and getattr(cls, "_is_ndarray", None) is not True:  # the charged numpy.ndarray below
        raise pickle.UnpicklingError("_reconstruct is only allowed for numpy.ndarray")
    dt = np.dtype(dtype_code) if not isinstance(dtype_code, np.dtype) else dtype_code
    charge(_prod(shape) * dt.itemsize, f"an array of shape {tuple(np.atleast_1d(shape))}")
    return np.ndarray.__new__(np.ndarray, shape, dt)


def _safe_ndarray(charge, shape, dtype=float, *args, **kwargs):
    """``numpy.ndarray(shape, dtype)`` called by a pickle: allocation charged against the budget, no buffers."""
    if args or kwargs:
        raise pickle.UnpicklingError("numpy.ndarray is only allowed as ndarray(shape, dtype)")
    dt = _safe_dtype(dtype)
    charge(_prod(shape) * dt.itemsize, f"an array of shape {shape!r}")
    return np.ndarray(shape, dt)


def _safe_scalar(dtype, data=None):
    """``numpy.core.multiarray.scalar`` for bool/int scalars (issame lists saved as numpy booleans)."""
    if not isinstance(dtype, np.dtype) or dtype.kind not in "biu":
        raise pickle.UnpicklingError("numpy scalar is only allowed for bool/int dtypes")
    return np.frombuffer(data, dtype=dtype, count=1)[0]


def _safe_bytearray(data=b"", encoding="latin1"):
    """``bytearray`` from bytes, or from a latin-1 ``str`` (how protocol-2 pickles write it); nothing else."""
    if isinstance(data, str) and encoding in ("latin1", "latin-1"):
        return bytearray(data.encode("latin1"))
    if not isinstance(data, (bytes, bytearray)):
        raise pickle.UnpicklingError("bytearray is only allowed from bytes or a latin-1 str")
    return bytearray(data)


_ALLOWED = {("_codecs", "encode"): _latin1_encode, ("numpy", "dtype"): _safe_dtype,
            ("builtins", "bytearray"): _safe_bytearray, ("__builtin__", "bytearray"): _safe_bytearray}
for _mod in ("numpy.core.multiarray", "numpy._core.multiarray"):  # numpy 1.x and 2.x pickles
    _ALLOWED[(_mod, "scalar")] = _safe_scalar
_CHARGED = {("numpy", "ndarray"): _safe_ndarray, ("numpy.core.multiarray", "_reconstruct"): _safe_reconstruct,
            ("numpy._core.multiarray", "_reconstruct"): _safe_reconstruct}  # these allocate: charged to a budget


class _SafeUnpickler(pickle.Unpickler):
    """Unpickler whose globals are limited to :data:`_ALLOWED`: only bytes, arrays, lists, tuples, bools, ints.

    Arrays a pickle asks to allocate are charged to ``budget`` bytes (the file size plus :data:`BIN_ALLOC_SLACK`).
    The one restricted unpickler for insightface ``.bin`` files (also :func:`recognition.verification.read_bin`).
    """

    def __init__(self, f, path: str, budget: int):
        super().__init__(f, encoding="bytes")  # insightface's bins are Python 2 pickles of ``str`` bytes
        self._path, self._budget, self._spent = path, int(budget), 0

    def _charge(self, nbytes: int, what: str) -> None:
        self._spent += int(nbytes)
        if self._spent > self._budget:
            raise ToolkitError(f"{self._path}: refusing {what}: the pickle would allocate {self._spent} bytes, more "
                               f"than its {self._budget - BIN_ALLOC_SLACK}-byte file can hold (a crafted .bin)")

    def find_class(self, module, name):
        key = (module, name)
        if key in _CHARGED:
            fn = _CHARGED[key]

            def charged(*a, **k):
                return fn(self._charge, *a, **k)

            charged._is_ndarray = key == ("numpy", "ndarray")  # type: ignore[attr-defined]
            return charged
        if key not in _ALLOWED:
            raise ToolkitError(f"{self._path}: refusing to unpickle forbidden global {module}.{name} "
                               "(a .bin may only hold image bytes, arrays, lists and bools)")
        return _ALLOWED[key]

    def persistent_load(self, pid):
        raise ToolkitError(f"{self._path}: refusing a pickle persistent id (not an insightface .bin)")


def _check_expanded(obj: object, path: str, budget: int) -> None:
    """Walk what was loaded as a consumer will see it (a memo-referenced object counts at every use): at most
    :data:`BIN_MAX_ITEMS` elements, :data:`BIN_MAX_DEPTH` levels and ``budget`` bytes of bytes/arrays in all."""
    items, total = 0, 0
    stack = [(obj, 0)]
    while stack:
        cur, depth = stack.pop()
        if isinstance(cur, (bytes, bytearray, str)):
            total += len(cur)
        elif isinstance(cur, np.ndarray):
            total += int(cur.nbytes)
        elif isinstance(cur, (list, tuple)):
            if depth >= BIN_MAX_DEPTH:
                raise ToolkitError(f"{path}: nested deeper than {BIN_MAX_DEPTH} levels (an insightface .bin is "
                                   "(images, issame))")
            items += len(cur)
            if items > BIN_MAX_ITEMS:
                raise ToolkitError(f"{path}: more than {BIN_MAX_ITEMS} list elements (counting repeated references)")
            stack.extend((c, depth + 1) for c in cur)
        if total > budget:
            raise ToolkitError(f"{path}: its objects add up to more than {budget} bytes when every reference is "
                               f"counted, more than the file holds (a pickle reusing one large object)")


def safe_load_pickle(path: str, max_image_bytes: int = MAX_IMAGE_BYTES,
                     max_image_pixels: int = MAX_IMAGE_PIXELS) -> object:
    """Unpickle ``path`` with :class:`_SafeUnpickler` within the bounds above; errors become one-line
    :class:`ToolkitError` naming the file."""
    if not os.path.isfile(path):
        raise ToolkitError(f"verification set {path} does not exist")
    budget = os.path.getsize(path) + BIN_ALLOC_SLACK
    try:
        with open(path, "rb") as f:
            obj = _SafeUnpickler(f, path, budget).load()
    except ToolkitError:
        raise
    except Exception as exc:  # UnpicklingError, EOFError, ValueError from a truncated or foreign file
        raise ToolkitError(f"{path}: not a readable insightface .bin pickle ({type(exc).__name__}: {exc})") from None
    _check_expanded(obj, path, budget)
    if isinstance(obj, (tuple, list)) and len(obj) == 2 and isinstance(obj[0], (list, tuple)):
        for i, im in enumerate(obj[0]):  # every reader decodes these next: refuse bombs before it does
            if isinstance(im, (bytes, bytearray, np.ndarray)):
                bin_image_bytes(im, path, i, max_image_bytes, max_image_pixels)
    return obj


def bin_image_bytes(im: object, path: str, i: int, max_bytes: int = MAX_IMAGE_BYTES,
                    max_pixels: int = MAX_IMAGE_PIXELS, check: bool = True) -> bytes:
    """Image ``i`` of a ``.bin`` as encoded bytes, refused (one line) past ``max_bytes`` or ``max_pixels``."""
    if isinstance(im, np.ndarray):
        if check and im.nbytes > max_bytes:
            raise ToolkitError(f"{path}: image {i} of {im.nbytes} bytes exceeds the limit of {max_bytes} bytes")
        im = im.tobytes()
    if isinstance(im, str):
        im = im.encode("latin1")
    if not isinstance(im, (bytes, bytearray)):
        raise ToolkitError(f"{path}: image {i} is a {type(im).__name__}, expected encoded bytes")
    if check:
        check_image(im, f"{path}: image {i}", max_bytes, max_pixels)
    return bytes(im)


def safe_load_bin_pickle(path: str, max_image_bytes: int = MAX_IMAGE_BYTES,
                         max_image_pixels: int = MAX_IMAGE_PIXELS) -> Tuple[List[bytes], List[bool]]:
    """Load an insightface verification ``.bin`` -> ``(list of encoded images, list of bool)`` without running code.

    Accepts Python 2 pickles (``str`` images read as bytes) and numpy-array images (returned as bytes).
    Checks: two lists, ``len(images) == 2 * len(issame)``, every image within ``max_image_bytes`` encoded and
    ``max_image_pixels`` declared in its header (read without decoding).
    """
    obj = safe_load_pickle(path, max_image_bytes, max_image_pixels)  # checks every image against the limits
    if not isinstance(obj, (tuple, list)) or len(obj) != 2:
        raise ToolkitError(f"{path}: expected a pickle of (images, issame), got {type(obj).__name__}")
    images, issame = obj
    if not isinstance(images, (list, tuple)) or not isinstance(issame, (list, tuple, np.ndarray)):
        raise ToolkitError(f"{path}: expected two lists (images, issame)")
    out = [bin_image_bytes(im, path, i, check=False) for i, im in enumerate(images)]
    flags = [bool(x) for x in issame]
    if len(out) != 2 * len(flags):
        raise ToolkitError(f"{path}: {len(out)} images for {len(flags)} pairs; expected exactly 2 images per pair")
    return out, flags


def save_bin(path: str, images: Iterable[bytes], issame: Iterable[bool]) -> str:
    """Write an insightface verification ``.bin`` atomically (pickle protocol 4 of two lists)."""
    images = [bytes(b) for b in images]
    issame = [bool(x) for x in issame]
    if len(images) != 2 * len(issame):
        raise ToolkitError(f"{path}: {len(images)} images for {len(issame)} pairs; need 2 images per pair")
    with atomic_write(path, "wb") as f:
        pickle.dump((images, issame), f, protocol=4)
    return path
