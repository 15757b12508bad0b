"""What the registry checks in a model's files before it stores them: names, file modes and the
header of every safetensors file (metadata only, bounded; no tensor data is read).

The safetensors layout: an 8-byte little-endian header length N, then N bytes of a UTF-8 JSON
object (``{"name": {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}``),
then the data buffer. Offsets are relative to the buffer; the tensors must tile it exactly, as the
reference implementation requires, so what passes here is what safetensors itself will open.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
from pathlib import Path, PurePosixPath
from typing import IO, Any

from ..errors import InvalidArtifact

MAX_HEADER_BYTES = 100_000_000  # the reference implementation's limit
SAFETENSORS_SUFFIX = ".safetensors"
DTYPE_BITS = {
    "BOOL": 8,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "C64": 64,
    "F64": 64,
    "I64": 64,
    "U64": 64,
}
_DRIVE = re.compile(r"^[A-Za-z]:")


class _Malformed(ValueError):
    """Why a safetensors header is refused (becomes one line of an InvalidArtifact)."""


# ---- names and modes ---------------------------------------------------------------------------
def name_problem(name: str) -> str | None:
    """Why a relative file name is unsafe to store (absolute, ``..``, NUL), as a predicate, or None."""
    if not name or "\x00" in name:
        return "is empty or has a NUL byte"
    if name.startswith(("/", "\\")) or _DRIVE.match(name):
        return "is an absolute path"
    if ".." in re.split(r"[/\\]", name):
        return "has a '..' component"
    return None


def check_stored_name(name: str, where: str) -> None:
    """A manifest's file path: relative, normalised, no ``..``; refused otherwise."""
    problem = name_problem(name)
    if problem is None and (PurePosixPath(name).as_posix() != name or "." in name.split("/") or "\\" in name):
        problem = "is not a normalised path"
    if problem is not None:
        raise InvalidArtifact(f"refusing {where}: file name {name!r} {problem}")


def mode_problem(mode: int) -> str | None:
    """Why a file mode is refused, as a predicate: anything but a plain file, or setuid/setgid bits."""
    if not stat.S_ISREG(mode):
        return "is not a regular file (a device, a fifo, a socket or a broken link)"
    if mode & (stat.S_ISUID | stat.S_ISGID):
        return "is setuid or setgid"
    return None


def check_folder_files(folder: Path, rel_files: list[Path]) -> None:
    """Every file of a model folder about to be registered: its mode, and its header when it is
    safetensors. Raises InvalidArtifact naming the first bad file."""
    for rel in rel_files:
        path = folder / rel
        st = os.stat(path)
        problem = mode_problem(st.st_mode)
        if problem is not None:
            raise InvalidArtifact(f"refusing {rel.as_posix()}: it {problem}; a model folder holds plain files only")
        if is_safetensors(rel.as_posix()):
            with open(path, "rb") as f:
                check_safetensors(f, st.st_size, rel.as_posix())


# ---- safetensors -------------------------------------------------------------------------------
def is_safetensors(name: str) -> bool:
    return name.lower().endswith(SAFETENSORS_SUFFIX)


def check_safetensors(f: IO[bytes], size: int, name: str) -> None:
    """Refuse a safetensors file whose header is malformed or inconsistent with its size."""
    problem = safetensors_problem(f, size)
    if problem is not None:
        raise InvalidArtifact(
            f"refusing {name}: not a valid safetensors file ({problem}); save it again with safetensors "
            "(save_file, or save_pretrained(dir, safe_serialization=True))"
        )


def safetensors_problem(f: IO[bytes], size: int) -> str | None:
    """Why `f` (of `size` bytes, read from its start) is not a valid safetensors file, or None."""
    try:
        header, length = _read_header(f, size)
        _check_tensors(header, size - 8 - length)
    except _Malformed as exc:
        return str(exc)
    return None


def _read_header(f: IO[bytes], size: int) -> tuple[dict[str, Any], int]:
    if size < 8:
        raise _Malformed(f"{size} bytes, shorter than the 8-byte header length")
    length = int.from_bytes(f.read(8), "little")
    if length > MAX_HEADER_BYTES:
        raise _Malformed(f"header length {length} is over the {MAX_HEADER_BYTES}-byte limit")
    if length > size - 8:
        raise _Malformed(f"header length {length} runs past the end of the {size}-byte file")
    raw = f.read(length)
    if len(raw) != length:
        raise _Malformed(f"the file ends inside its {length}-byte header")
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except _Malformed:
        raise
    except (UnicodeDecodeError, ValueError) as exc:
        raise _Malformed(f"the header is not JSON: {_first_line(exc)}") from None
    if not isinstance(header, dict):
        raise _Malformed("the header is not a JSON object")
    return header, length


def _check_tensors(header: dict[str, Any], buffer_bytes: int) -> None:
    """The tensors tile the data buffer: sorted by offset, each starts where the last ended (no
    overlap, no gap), and the last ends at the end of the file."""
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise _Malformed("__metadata__ must map strings to strings")
    end = 0
    for (begin, stop), name in sorted((_span(name, info), name) for name, info in header.items()):
        if begin < end:
            raise _Malformed(f"tensor {name!r} overlaps the tensor before it (offset {begin} < {end})")
        if begin > end:
            raise _Malformed(f"a gap before tensor {name!r} (offset {begin}, expected {end})")
        if stop > buffer_bytes:
            raise _Malformed(f"tensor {name!r} ends at offset {stop}, past the {buffer_bytes}-byte data buffer")
        end = stop
    if end != buffer_bytes:
        raise _Malformed(f"the tensors cover {end} of the {buffer_bytes} data bytes")


def _span(name: str, info: Any) -> tuple[int, int]:
    if not isinstance(info, dict):
        raise _Malformed(f"tensor {name!r}: its entry is not an object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype not in DTYPE_BITS:
        raise _Malformed(f"tensor {name!r}: unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise _Malformed(f"tensor {name!r}: shape must be a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
        raise _Malformed(f"tensor {name!r}: data_offsets must be [begin, end], non-negative integers")
    begin, end = offsets
    if end < begin:
        raise _Malformed(f"tensor {name!r}: data_offsets end {end} is before begin {begin}")
    bits = math.prod(shape) * DTYPE_BITS[dtype]
    if bits % 8 or bits // 8 != end - begin:
        raise _Malformed(f"tensor {name!r}: {dtype} {shape} needs {bits / 8:g} bytes, data_offsets span {end - begin}")
    return begin, end


def _is_count(value: Any) -> bool:
    return type(value) is int and value >= 0  # not bool, not float


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _Malformed(f"the header names {key!r} twice")
        out[key] = value
    return out


def _first_line(exc: Exception) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
