"""What the registry checks in a model's files before it stores them: names, file modes, the
header of every safetensors file and the protobuf structure of every ONNX file (metadata only,
bounded; no tensor data is read).

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
        elif is_onnx(rel.as_posix()):
            with open(path, "rb") as f:
                check_onnx(f, st.st_size, rel.as_posix())


def checked_format(name: str) -> str | None:
    """The format whose structure is checked for a file of this name ("safetensors", "ONNX"), or None."""
    if is_safetensors(name):
        return "safetensors"
    if is_onnx(name):
        return "ONNX"
    return None


def structure_problem(name: str, f: IO[bytes], size: int) -> str | None:
    """Why `f` (of `size` bytes, named `name`) is malformed for its format, or None (also for files
    of formats that are not checked)."""
    if is_safetensors(name):
        return safetensors_problem(f, size)
    if is_onnx(name):
        return onnx_problem(f, size)
    return None


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


# ---- ONNX --------------------------------------------------------------------------------------
# An ONNX file is one protobuf ModelProto. Its top-level fields, and those of its graph, are walked
# by their wire-format tags and lengths: every field must be well formed and the fields must tile
# the file (and the graph its field) exactly, which a truncated or overwritten file does not. Large
# fields (initializers: the weights) are skipped by seeking, never read.
ONNX_SUFFIX = ".onnx"
_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5
_MODEL_FIELDS = {1: ("ir_version", _VARINT), 7: ("graph", _LEN), 8: ("opset_import", _LEN)}
_GRAPH_FIELDS = {1: ("node", _LEN), 5: ("initializer", _LEN), 11: ("input", _LEN), 12: ("output", _LEN)}
_MAX_IR_VERSION = 100  # ONNX is at 11; far beyond that is not a version but garbage


def is_onnx(name: str) -> bool:
    return name.lower().endswith(ONNX_SUFFIX)


def check_onnx(f: IO[bytes], size: int, name: str) -> None:
    """Refuse an ONNX file whose protobuf structure is malformed, truncated or not a model."""
    problem = onnx_problem(f, size)
    if problem is not None:
        raise InvalidArtifact(
            f"refusing {name}: not a valid ONNX model ({problem}); export it again (torch.onnx.export or "
            "`moorage compress REF --method onnx`)"
        )


def onnx_problem(f: IO[bytes], size: int) -> str | None:
    """Why `f` (of `size` bytes, read from its start) is not a well-formed ONNX model, or None."""
    try:
        model = _fields(f, 0, size, _MODEL_FIELDS, "the file")
        ir_version = model.get("ir_version", [])
        if len(ir_version) != 1 or not 1 <= ir_version[0] <= _MAX_IR_VERSION:
            raise _Malformed(f"ir_version {ir_version[0] if ir_version else 'missing'}, not an ONNX IR version")
        if len(model.get("graph", [])) != 1:
            raise _Malformed(f"{len(model.get('graph', []))} graphs, not one")
        if not model.get("opset_import"):
            raise _Malformed("no opset_import")
        start, length = model["graph"][0]
        graph = _fields(f, start, start + length, _GRAPH_FIELDS, "the graph")
        if not graph.get("output"):
            raise _Malformed("the graph has no output")
    except _Malformed as exc:
        return str(exc)
    return None


def _fields(f: IO[bytes], start: int, end: int, known: dict[int, tuple[str, int]], where: str) -> dict[str, list[Any]]:
    """Walk the protobuf fields from `start` to `end`; for the `known` field numbers check the wire
    type and collect their values (varints) or (offset, length) spans (length-delimited)."""
    found: dict[str, list[Any]] = {}
    pos = start
    f.seek(start)
    while pos < end:
        tag, pos = _varint(f, pos, end, where)
        number, wire = tag >> 3, tag & 7
        if number == 0:
            raise _Malformed(f"{where} has a field numbered 0 at offset {pos}")
        name, expected = known.get(number, ("", wire))
        if wire != expected:
            raise _Malformed(f"{where}: field {name or number} has wire type {wire}, expected {expected}")
        value: Any = None
        if wire == _VARINT:
            value, pos = _varint(f, pos, end, where)
        elif wire == _LEN:
            length, pos = _varint(f, pos, end, where)
            if pos + length > end:
                raise _Malformed(f"{where}: field {name or number} of {length} bytes runs past its end at {end}")
            value, pos = (pos, length), pos + length
            f.seek(pos)
        elif wire in (_I64, _I32):
            pos += 8 if wire == _I64 else 4
            if pos > end:
                raise _Malformed(f"{where} ends inside a fixed-width field")
            f.seek(pos)
        else:
            raise _Malformed(f"{where} has a field with wire type {wire} (groups or garbage) at offset {pos}")
        if name:
            found.setdefault(name, []).append(value)
    return found


def _varint(f: IO[bytes], pos: int, end: int, where: str) -> tuple[int, int]:
    value = shift = 0
    for _ in range(10):
        if pos >= end:
            raise _Malformed(f"{where} ends inside a varint")
        byte = f.read(1)
        if not byte:
            raise _Malformed(f"{where} ends inside a varint (the file is truncated)")
        pos += 1
        value |= (byte[0] & 0x7F) << shift
        if byte[0] < 0x80:
            return value, pos
        shift += 7
    raise _Malformed(f"{where} has a varint longer than 10 bytes at offset {pos}")
