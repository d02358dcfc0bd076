"""The byte layout of an MXNet ``.params`` file (``mx.nd.save``), walked without loading it, to say why MXNet refused
one: MXNet itself only says "Invalid NDArray file format" under a C++ stack.
"""
from __future__ import annotations

import os
import struct
from typing import Optional

# mx.nd.save's layout (src/ndarray/ndarray.cc): u64 0x112, u64 0, u64 count, count arrays, u64 count, names.
# An array (V2/V3 magic): u32 magic, i32 storage type, u32 ndim, i64 dims[ndim], then (ndim > 0) i32 dev_type,
# i32 dev_id, i32 dtype flag and the data.
_ND_LIST_MAGIC = 0x112
_ND_MAGICS = (0xF993FAC9, 0xF993FACA)
_ND_ITEMSIZE = {0: 4, 1: 8, 2: 2, 3: 1, 4: 4, 5: 1, 6: 8, 7: 1, 12: 2}


def params_problem(path: str) -> Optional[str]:
    """Walk a ``.params`` file's layout without loading it; returns what is wrong (``truncated at byte N (expected
    M)``, a bad magic at byte N, trailing bytes) or ``None`` when the layout is sound (or a kind this walk skips)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        data = f.read()  # only called after MXNet refused the file: clarity over memory here
    pos = 0

    def take(fmt: str, what: str):
        nonlocal pos
        n = struct.calcsize(fmt)
        if pos + n > size:
            raise _Short(pos + n, what)
        out = struct.unpack_from(fmt, data, pos)
        pos += n
        return out

    try:
        magic, _ = take("<QQ", "the file header")
        if magic != _ND_LIST_MAGIC:
            return f"byte 0: magic 0x{magic:x} is not an MXNet params file (0x112)"
        (count,) = take("<Q", "the array count")
        for i in range(count):
            start = pos
            amagic, stype = take("<Ii", f"array {i}")
            if amagic not in _ND_MAGICS:
                return f"byte {start}: array {i} has magic 0x{amagic:x}, not an NDArray header"
            if stype not in (0, -1):
                return None  # sparse storage: leave it to MXNet
            (ndim,) = take("<i", f"array {i} shape")
            dims = take(f"<{max(ndim, 0)}q", f"array {i} shape") if ndim > 0 else ()
            if ndim <= 0:
                continue
            _, _, flag = take("<iii", f"array {i} context")
            if flag not in _ND_ITEMSIZE or min(dims) < 0:
                return f"byte {start}: array {i} has dtype flag {flag} / shape {tuple(dims)}, not a valid array"
            nbytes = _ND_ITEMSIZE[flag]
            for d in dims:
                nbytes *= d
            if pos + nbytes > size:
                raise _Short(pos + nbytes, f"array {i} data")
            pos += nbytes
        (nnames,) = take("<Q", "the name count")
        for i in range(nnames):
            (n,) = take("<Q", f"name {i}")
            if pos + n > size:
                raise _Short(pos + n, f"name {i}")
            pos += n
    except _Short as short:
        return f"truncated at byte {size} (expected {short.need}): {short.what} is cut short"
    if pos != size:
        return f"{size - pos} unexpected bytes after the end of the data at byte {pos}"
    return None


class _Short(Exception):
    def __init__(self, need: int, what: str):
        super().__init__(what)
        self.need, self.what = need, what
