"""Model weights as named numpy arrays: conversion, transport and storage.

This is the one place weights change form. A model's ``state_dict`` becomes an
ordered ``dict[str, numpy.ndarray]`` (:func:`model_to_ndarrays`), travels in a
Flower :class:`~flwr.app.ArrayRecord` (:func:`to_array_record`) and is stored as
safetensors (:func:`save_safetensors`). Nothing here uses pickle: ArrayRecord
serialises with ``numpy.save(..., allow_pickle=False)`` and safetensors is a
plain header + raw little-endian bytes.

Key order is part of the value everywhere (it defines :func:`flatten`'s layout),
and 0-d arrays are real parameters that must survive every round trip.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import safetensors.numpy
from flwr.app import Array, ArrayRecord

from fl_app.atomic import write_atomic

if TYPE_CHECKING:  # torch is imported lazily: the array-record helpers serve
    # torch-free processes (the round driver, key-exchange stages).
    import torch
    from torch import nn

__all__ = [
    "array_view",
    "flatten",
    "from_array_record",
    "load_ndarrays",
    "load_safetensors",
    "model_to_ndarrays",
    "save_safetensors",
    "to_array_record",
    "unflatten",
    "weights_digest",
]


def array_view(raw: bytes, dtype: np.dtype | str, shape: tuple[int, ...]) -> np.ndarray:
    """A read-only view of the ``.npy`` bytes of a Flower ``Array`` (``Array.data``).

    ``Array.numpy()`` copies every array through ``np.load``; for updates of millions of
    values from many clients the copy is a large part of the server's ingestion. The
    header is parsed by numpy's own ``.npy`` reader (literal-only, never pickle), the
    declared dtype and shape must be the expected ones (C order), the data length must
    be exact, and the data is viewed in place. ``ValueError`` on any mismatch.
    """
    import io

    want = np.dtype(dtype)
    buf = io.BytesIO(raw)
    version = np.lib.format.read_magic(buf)
    if version == (1, 0):
        found_shape, fortran, found = np.lib.format.read_array_header_1_0(buf)
    elif version == (2, 0):
        found_shape, fortran, found = np.lib.format.read_array_header_2_0(buf)
    else:
        raise ValueError(f".npy version {version} not accepted")
    if tuple(found_shape) != tuple(shape) or found != want:
        raise ValueError(
            f"array decodes to {found}{list(found_shape)}, expected {want}{list(shape)}"
        )
    if fortran and len(shape) > 1:
        raise ValueError("array is stored in Fortran order; expected C order")
    offset = buf.tell()
    count = math.prod(shape)
    if len(raw) - offset != count * want.itemsize:
        raise ValueError(
            f"array holds {len(raw) - offset} data bytes, expected {count * want.itemsize}"
        )
    return np.frombuffer(raw, dtype=want, count=count, offset=offset).reshape(shape)


# numpy dtype -> safetensors dtype code (the codes safetensors.numpy can read back).
_ST_DTYPES: dict[np.dtype, str] = {
    np.dtype(np.float64): "F64",
    np.dtype(np.float32): "F32",
    np.dtype(np.float16): "F16",
    np.dtype(np.int64): "I64",
    np.dtype(np.int32): "I32",
    np.dtype(np.int16): "I16",
    np.dtype(np.int8): "I8",
    np.dtype(np.uint64): "U64",
    np.dtype(np.uint32): "U32",
    np.dtype(np.uint16): "U16",
    np.dtype(np.uint8): "U8",
    np.dtype(np.bool_): "BOOL",
}
_HEADER_MAX_BYTES = 100_000_000


def _numeric(key: str, value: object) -> np.ndarray:
    arr = np.asarray(value)
    if arr.dtype.kind not in "biuf":
        raise ValueError(f"array {key!r} has unsupported dtype {arr.dtype} (need bool/int/float)")
    return arr


def model_to_ndarrays(model: nn.Module) -> dict[str, np.ndarray]:
    """Copy a model's ``state_dict`` to numpy arrays on the CPU.

    Parameters
    ----------
    model : torch.nn.Module
        Source model.

    Returns
    -------
    dict[str, numpy.ndarray]
        In ``state_dict`` order; floating tensors become ``float32`` copies,
        integer and boolean buffers (if any) keep their dtype. The arrays own their
        memory (later training does not change them).
    """
    import torch

    out: dict[str, np.ndarray] = {}
    for key, tensor in model.state_dict().items():
        t = tensor.detach().to("cpu")
        if t.is_floating_point():
            t = t.to(torch.float32)
        out[key] = t.numpy().copy()
    return out


def load_ndarrays(model: nn.Module, arrays: Mapping[str, np.ndarray]) -> None:
    """Copy named arrays into a model's parameters and buffers, in place.

    The tensors are updated with ``copy_`` (cast to their own dtype and device),
    so optimizers holding the parameters stay valid.

    Parameters
    ----------
    model : torch.nn.Module
        Destination model.
    arrays : Mapping[str, numpy.ndarray]
        One array per ``state_dict`` key, with the same shape.

    Raises
    ------
    ValueError
        Naming the keys that are missing or unexpected, or the first key whose
        shape or dtype does not fit. The model is unchanged when this is raised.
    """
    import torch

    state = model.state_dict()
    missing = [k for k in state if k not in arrays]
    extra = [k for k in arrays if k not in state]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing keys {missing}")
        if extra:
            parts.append(f"unexpected keys {extra}")
        raise ValueError(f"arrays do not match the model's state_dict: {'; '.join(parts)}")
    sources: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        arr = _numeric(key, arrays[key])
        if tuple(arr.shape) != tuple(tensor.shape):
            raise ValueError(
                f"shape mismatch for key {key!r}: model has {tuple(tensor.shape)}, "
                f"array has {tuple(arr.shape)}"
            )
        sources[key] = torch.from_numpy(np.require(arr, requirements=["C", "W"]))
    with torch.no_grad():
        for key, tensor in state.items():
            tensor.copy_(sources[key])


def to_array_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    """Pack named arrays into a Flower :class:`~flwr.app.ArrayRecord`, keeping key order.

    ``ArrayRecord`` itself accepts a list of arrays (positional keys) or a torch
    ``state_dict``; named numpy arrays are wrapped as :class:`~flwr.app.Array` here.

    Parameters
    ----------
    arrays : Mapping[str, numpy.ndarray]
        Named numeric arrays (any shape, 0-d included).

    Returns
    -------
    flwr.app.ArrayRecord
        One :class:`~flwr.app.Array` per key, serialised without pickle.
    """
    record = ArrayRecord()
    for key, value in arrays.items():
        if not isinstance(key, str):
            raise ValueError(f"array names must be str, found {key!r}")
        record[key] = Array(_numeric(key, value))
    return record


def from_array_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    """Unpack an :class:`~flwr.app.ArrayRecord` into named numpy arrays, in record order.

    Parameters
    ----------
    record : flwr.app.ArrayRecord
        Typically received from another party.

    Returns
    -------
    dict[str, numpy.ndarray]
        Writable arrays with the dtypes and shapes that were sent.

    Raises
    ------
    ValueError
        Naming the key of an entry that is not a numpy-serialised numeric array or
        whose data disagree with its declared shape.
    """
    out: dict[str, np.ndarray] = {}
    for key, item in record.items():
        try:
            arr = item.numpy()
        except Exception as exc:
            raise ValueError(f"array {key!r} in the record cannot be decoded: {exc}") from exc
        arr = _numeric(key, arr)
        if tuple(arr.shape) != tuple(item.shape):
            raise ValueError(
                f"array {key!r} declares shape {tuple(item.shape)} but holds {tuple(arr.shape)}"
            )
        out[key] = np.require(arr, requirements=["C", "W"])
    return out


def save_safetensors(
    path: str | os.PathLike[str],
    arrays: Mapping[str, np.ndarray],
    metadata: Mapping[str, str],
) -> str:
    """Write named arrays and string metadata to a safetensors file, atomically.

    Serialised by the ``safetensors`` library; the file is written next to ``path``
    and renamed into place, and the SHA-256 of exactly the bytes written is
    returned (the fingerprint a manifest or audit record refers to).

    Parameters
    ----------
    path : str or os.PathLike
        Destination file (parent directories are created).
    arrays : Mapping[str, numpy.ndarray]
        Named numeric arrays.
    metadata : Mapping[str, str]
        Free-form text metadata stored in the header.

    Returns
    -------
    str
        SHA-256 hex digest of the file written.

    Raises
    ------
    ValueError
        If a name, dtype or metadata entry cannot be stored.
    """
    for k, v in metadata.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise ValueError(f"metadata must map str to str, found {k!r}: {v!r}")
    tensors: dict[str, np.ndarray] = {}
    for key, value in arrays.items():
        if not isinstance(key, str) or key == "__metadata__":
            raise ValueError(f"invalid array name {key!r}")
        arr = np.require(_numeric(key, value), requirements=["C"])  # keeps 0-d shapes
        if arr.dtype.newbyteorder("=") not in _ST_DTYPES:
            raise ValueError(f"array {key!r} has dtype {arr.dtype}, which safetensors cannot store")
        tensors[key] = arr
    blob = safetensors.numpy.save(tensors, metadata=dict(metadata) or None)
    write_atomic(path, blob)
    return hashlib.sha256(blob).hexdigest()


def weights_digest(arrays: Mapping[str, np.ndarray]) -> str:
    """SHA-256 over the arrays' names, dtypes, shapes and little-endian bytes, by name.

    A fingerprint of the *content*, independent of any file format: the safetensors
    library writes its metadata in a per-process random order, so two byte-different
    files can hold the same model. Reproducibility checks compare this digest.
    """
    h = hashlib.sha256()
    for key in sorted(arrays):
        arr = np.asarray(arrays[key])
        le = arr.astype(arr.dtype.newbyteorder("<"), copy=False)
        h.update(f"{key}\0{le.dtype.str}\0{list(arr.shape)}\0".encode())
        h.update(np.require(le, requirements=["C"]).tobytes())
    return h.hexdigest()


def load_safetensors(path: str | os.PathLike[str]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Read a safetensors file written by :func:`save_safetensors` (or any other).

    Parameters
    ----------
    path : str or os.PathLike
        File to read.

    Returns
    -------
    tuple
        ``(arrays, metadata)``: writable arrays keyed by name (the library lays tensors
        out by alignment, so match by name, not order) and the metadata.

    Raises
    ------
    ValueError
        If the file is not valid safetensors.
    """
    blob = Path(path).read_bytes()
    if len(blob) < 8:
        raise ValueError(f"{os.fspath(path)!r} is not a safetensors file (too short)")
    n = int.from_bytes(blob[:8], "little")
    if n > min(_HEADER_MAX_BYTES, len(blob) - 8):
        raise ValueError(f"{os.fspath(path)!r} is not a safetensors file (bad header size)")
    try:
        header = json.loads(blob[8 : 8 + n])
        tensors = safetensors.numpy.load(blob)
    except Exception as exc:
        raise ValueError(f"{os.fspath(path)!r} is not a valid safetensors file: {exc}") from exc
    if not isinstance(header, dict):
        raise ValueError(f"{os.fspath(path)!r} has a malformed safetensors header")
    meta_raw = header.pop("__metadata__", None) or {}
    if not isinstance(meta_raw, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in meta_raw.items()
    ):
        raise ValueError(f"{os.fspath(path)!r} has non-string metadata")
    if set(header) != set(tensors):
        raise ValueError(f"{os.fspath(path)!r}: header and tensors disagree")
    arrays = {k: np.require(tensors[k], requirements=["C", "W"]) for k in header}
    return arrays, dict(meta_raw)


def _as_float64_vector(arr: np.ndarray) -> np.ndarray:
    return np.asarray(arr, dtype=np.float64).reshape(-1)


def flatten(arrays: Mapping[str, np.ndarray]) -> np.ndarray:
    """Concatenate all arrays, in key order, into one ``float64`` vector.

    Parameters
    ----------
    arrays : Mapping[str, numpy.ndarray]
        Named arrays; a 0-d array contributes one element.

    Returns
    -------
    numpy.ndarray
        1-d ``float64`` vector of ``sum(a.size)`` elements (a new array).
    """
    parts = [_as_float64_vector(a) for a in arrays.values()]
    if not parts:
        return np.zeros(0, dtype=np.float64)
    return np.concatenate(parts)


def unflatten(vec: np.ndarray, like: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Split a flat vector back into arrays shaped and typed like ``like``.

    Inverse of :func:`flatten`. Integer targets are rounded to the nearest
    integer, boolean targets are ``vec != 0``.

    Parameters
    ----------
    vec : numpy.ndarray
        1-d vector with exactly as many elements as ``like`` holds.
    like : Mapping[str, numpy.ndarray]
        Template: key order, shapes and dtypes.

    Returns
    -------
    dict[str, numpy.ndarray]
        New arrays (not views of ``vec``), in ``like``'s key order.

    Raises
    ------
    ValueError
        If ``vec`` is not 1-d or its length does not match.
    """
    flat = np.asarray(vec)
    if flat.ndim != 1:
        raise ValueError(f"expected a 1-d vector, found shape {flat.shape}")
    templates = {k: np.asarray(v) for k, v in like.items()}
    total = sum(t.size for t in templates.values())
    if flat.shape[0] != total:
        raise ValueError(f"vector has {flat.shape[0]} elements, the template needs {total}")
    out: dict[str, np.ndarray] = {}
    offset = 0
    for key, t in templates.items():
        chunk = flat[offset : offset + t.size].reshape(t.shape)
        offset += t.size
        if t.dtype.kind == "b":
            out[key] = chunk != 0
        elif t.dtype.kind in "iu":
            out[key] = np.rint(chunk).astype(t.dtype)
        else:
            out[key] = chunk.astype(t.dtype, copy=True)
    return out
