"""Pure-numpy reader for PyTorch checkpoints (no ``torch`` import).

Supports the legacy pickle-sequence format (``torch.save`` before 1.6 or with
``_use_new_zipfile_serialization=False``) and the plain zip format. Unpickling
is restricted to an allow-list of globals so a hostile file cannot run code.
"""

from __future__ import annotations

import io
import pickle
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import IO, Any

import numpy as np

from tlpipe.core.errors import PipelineError

__all__ = [
    "LEGACY_MAGIC_NUMBER",
    "CheckpointError",
    "ForbiddenGlobalError",
    "load_legacy_state_dict",
]

LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
_SUPPORTED_PROTOCOL_VERSION = 1001
_STATE_DICT_WRAPPER_KEYS = ("state_dict", "model_state_dict")
_ZIP_MAGIC = b"PK\x03\x04"

# Storage class name -> little-endian numpy dtype. BFloat16 has no numpy
# dtype; its raw 16-bit words are widened to float32 after reading.
_STORAGE_DTYPES: dict[str, np.dtype] = {
    name: np.dtype(code)
    for name, code in {
        "DoubleStorage": "<f8",
        "FloatStorage": "<f4",
        "HalfStorage": "<f2",
        "BFloat16Storage": "<u2",
        "LongStorage": "<i8",
        "IntStorage": "<i4",
        "ShortStorage": "<i2",
        "CharStorage": "i1",
        "ByteStorage": "u1",
        "BoolStorage": "?",
        "ComplexFloatStorage": "<c8",
        "ComplexDoubleStorage": "<c16",
    }.items()
}


class CheckpointError(PipelineError, ValueError):
    """The file is not a readable PyTorch checkpoint."""


class ForbiddenGlobalError(CheckpointError, pickle.UnpicklingError):
    """The pickle references a global outside the allow-list."""


@dataclass(frozen=True)
class _StorageRef:
    """A storage named by a persistent id; its bytes are read later."""

    key: str
    storage_type: str
    numel: int
    view_offset: int = 0


@dataclass(frozen=True)
class _TensorRef:
    """A strided view of a storage, materialised once storages are read."""

    storage: _StorageRef
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor(storage: _StorageRef, offset: int, size: tuple, stride: tuple, *_: Any) -> _TensorRef:
    """Stand-in for ``torch._utils._rebuild_tensor[_v2]``."""
    if not isinstance(storage, _StorageRef):
        raise CheckpointError(f"tensor rebuilt from a non-storage object: {type(storage).__name__}")
    return _TensorRef(storage, int(offset), tuple(int(s) for s in size), tuple(int(s) for s in stride))


def _rebuild_parameter(data: _TensorRef, *_: Any) -> _TensorRef:
    """Stand-in for ``torch._utils._rebuild_parameter``: a parameter is its data."""
    return data


_ALLOWED_CALLABLES: dict[tuple[str, str], Callable[..., Any]] = {
    ("collections", "OrderedDict"): OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
}


class _StorageType(str):
    """Marker returned for ``torch.*Storage`` globals (only used inside persistent ids)."""


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only allow-listed globals and records storages."""

    def __init__(self, file: IO[bytes]) -> None:
        super().__init__(file)
        self.storages: dict[str, _StorageRef] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_CALLABLES:
            return _ALLOWED_CALLABLES[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        raise ForbiddenGlobalError(
            f"checkpoint references forbidden global {module}.{name}; "
            "only plain tensors / state dicts can be loaded without torch"
        )

    def persistent_load(self, pid: Any) -> _StorageRef:
        if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"):
            raise CheckpointError(f"unsupported persistent id: {pid!r}")
        storage_type, key, _location, numel = pid[1:5]
        if not isinstance(storage_type, _StorageType):
            raise CheckpointError(f"unsupported storage type in persistent id: {storage_type!r}")
        root = self._register(_StorageRef(str(key), str(storage_type), int(numel)))
        view = pid[5] if len(pid) == 6 else None
        if view is None:
            return root
        view_key, view_offset, view_numel = view
        if not 0 <= view_offset <= view_offset + view_numel <= root.numel:
            raise CheckpointError(f"storage view {view_key!r} lies outside storage {key!r}")
        return _StorageRef(root.key, root.storage_type, int(view_numel), root.view_offset + int(view_offset))

    def _register(self, ref: _StorageRef) -> _StorageRef:
        known = self.storages.setdefault(ref.key, ref)
        if known != ref:
            raise CheckpointError(f"storage {ref.key!r} declared twice with different types/sizes")
        return known


def _restricted_load(unpickler: _RestrictedUnpickler) -> Any:
    """Run ``unpickler``, turning any low-level failure into ``CheckpointError``."""
    try:
        return unpickler.load()
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"corrupt or non-checkpoint pickle data: {exc!r}") from exc


def _load_one(file: IO[bytes]) -> Any:
    return _restricted_load(_RestrictedUnpickler(file))


def _storage_dtype(ref: _StorageRef, little_endian: bool) -> np.dtype:
    dtype = _STORAGE_DTYPES[ref.storage_type]
    return dtype if little_endian else dtype.newbyteorder(">")


def _remaining_bytes(file: IO[bytes]) -> int:
    here = file.tell()
    end = file.seek(0, io.SEEK_END)
    file.seek(here)
    return end - here


def _read_exact(file: IO[bytes], nbytes: int, what: str) -> bytes:
    # Checked up front: a forged element count must not trigger a huge allocation.
    if nbytes > _remaining_bytes(file):
        raise CheckpointError(f"file truncated while reading {what}")
    data = file.read(nbytes)
    if len(data) != nbytes:
        raise CheckpointError(f"file truncated while reading {what}")
    return data


def _read_legacy_storages(
    file: IO[bytes], keys: list[str], storages: dict[str, _StorageRef], little_endian: bool
) -> dict[str, np.ndarray]:
    """Read ``[int64 numel][raw data]`` records in the order of ``keys``."""
    count_dtype = np.dtype("<i8" if little_endian else ">i8")
    arrays: dict[str, np.ndarray] = {}
    for key in keys:
        if key not in storages:
            raise CheckpointError(f"storage {key!r} has data but is not referenced by any tensor")
        ref = storages[key]
        numel = int(np.frombuffer(_read_exact(file, 8, f"size of storage {key!r}"), count_dtype)[0])
        if numel != ref.numel:
            raise CheckpointError(f"storage {key!r} holds {numel} elements, expected {ref.numel}")
        dtype = _storage_dtype(ref, little_endian)
        raw = _read_exact(file, numel * dtype.itemsize, f"data of storage {key!r}")
        arrays[key] = np.frombuffer(raw, dtype)
    return arrays


def _materialise(ref: _TensorRef, storages: dict[str, np.ndarray]) -> np.ndarray:
    """Build an owning C-contiguous array, bounds-checking the strided view."""
    if ref.storage.key not in storages:
        raise CheckpointError(f"tensor refers to missing storage {ref.storage.key!r}")
    base = storages[ref.storage.key][ref.storage.view_offset : ref.storage.view_offset + ref.storage.numel]
    if len(ref.size) != len(ref.stride) or min(ref.size + ref.stride + (ref.offset,), default=0) < 0:
        raise CheckpointError(f"invalid tensor geometry size={ref.size} stride={ref.stride}")
    if 0 not in ref.size:
        # as_strided does no bounds checking, so a hostile file could otherwise read arbitrary memory.
        last = ref.offset + sum((n - 1) * s for n, s in zip(ref.size, ref.stride, strict=True))
        if last >= base.size:
            raise CheckpointError(
                f"tensor view (offset={ref.offset}, size={ref.size}, stride={ref.stride}) "
                f"exceeds storage of {base.size} elements"
            )
    start = base[ref.offset :] if 0 not in ref.size else base[:0]
    view = np.lib.stride_tricks.as_strided(
        start, shape=ref.size, strides=tuple(s * base.itemsize for s in ref.stride), writeable=False
    )
    array = np.array(view, dtype=view.dtype.newbyteorder("="), order="C", copy=True)
    if ref.storage.storage_type == "BFloat16Storage":
        array = (array.astype(np.uint32) << 16).view(np.float32)
    return array


def _resolve(obj: Any, storages: dict[str, np.ndarray]) -> Any:
    """Replace tensor placeholders inside dicts/lists/tuples with arrays."""
    try:
        return _resolve_nested(obj, storages)
    except RecursionError as exc:  # self-referencing containers can be built by a pickle
        raise CheckpointError("checkpoint object graph is cyclic or too deeply nested") from exc


def _resolve_nested(obj: Any, storages: dict[str, np.ndarray]) -> Any:
    if isinstance(obj, _TensorRef):
        return _materialise(obj, storages)
    if isinstance(obj, dict):
        return type(obj)((key, _resolve_nested(value, storages)) for key, value in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(_resolve_nested(value, storages) for value in obj)
    return obj


def _load_legacy(file: IO[bytes]) -> Any:
    magic = _load_one(file)
    if magic != LEGACY_MAGIC_NUMBER:
        raise CheckpointError("not a PyTorch legacy checkpoint (bad magic number)")
    protocol = _load_one(file)
    if protocol != _SUPPORTED_PROTOCOL_VERSION:
        raise CheckpointError(f"unsupported legacy protocol version {protocol!r}")
    sys_info = _load_one(file)
    little_endian = bool(sys_info.get("little_endian", True)) if isinstance(sys_info, dict) else True
    unpickler = _RestrictedUnpickler(file)
    result = _restricted_load(unpickler)
    keys = _load_one(file)
    if not (isinstance(keys, list) and all(isinstance(k, str) for k in keys)):
        raise CheckpointError("malformed storage key list")
    return _resolve(result, _read_legacy_storages(file, keys, unpickler.storages, little_endian))


def _load_zip(path: Path) -> Any:
    """Read the zip format: ``<root>/data.pkl`` plus one ``<root>/data/<key>`` record per storage."""
    with zipfile.ZipFile(path) as archive:
        pickles = [name for name in archive.namelist() if name.endswith("data.pkl") and name.count("/") == 1]
        if len(pickles) != 1:
            raise CheckpointError(f"{path} is a zip file but not a PyTorch checkpoint (no unique data.pkl)")
        root = pickles[0].rsplit("/", 1)[0]
        byteorder_name = f"{root}/byteorder"
        little_endian = (
            archive.read(byteorder_name).strip() != b"big" if byteorder_name in archive.namelist() else True
        )
        unpickler = _RestrictedUnpickler(io.BytesIO(archive.read(pickles[0])))
        result = _restricted_load(unpickler)
        arrays = {}
        for key, ref in unpickler.storages.items():
            dtype = _storage_dtype(ref, little_endian)
            try:
                raw = archive.read(f"{root}/data/{key}")
            except KeyError as exc:
                raise CheckpointError(f"zip checkpoint lacks data for storage {key!r}") from exc
            if len(raw) < ref.numel * dtype.itemsize:
                raise CheckpointError(f"zip record for storage {key!r} is truncated")
            arrays[key] = np.frombuffer(raw, dtype, count=ref.numel)
    return _resolve(result, arrays)


def _unwrap_state_dict(obj: Any) -> Any:
    """Return ``obj['state_dict']`` (or similar) when the checkpoint wraps one."""
    if isinstance(obj, dict):
        for key in _STATE_DICT_WRAPPER_KEYS:
            if isinstance(obj.get(key), dict):
                return obj[key]
    return obj


def _as_state_dict(obj: Any, path: Path) -> dict[str, np.ndarray]:
    obj = _unwrap_state_dict(obj)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict")
    bad = [key for key, value in obj.items() if not isinstance(value, np.ndarray)]
    if bad:
        raise CheckpointError(f"{path}: state dict entries are not tensors: {bad[:5]}")
    return {str(key): value for key, value in obj.items()}


def load_legacy_state_dict(path: str | PathLike[str]) -> dict[str, np.ndarray]:
    """Read a PyTorch checkpoint's state dict as ``{name: C-contiguous ndarray}``.

    Legacy pickle-sequence files are the main target; zip-format files are also
    accepted. Raises ``CheckpointError`` for anything else and
    ``ForbiddenGlobalError`` if the pickle references a non-allow-listed global.
    """
    path = Path(path)
    with path.open("rb") as file:
        is_zip = file.read(len(_ZIP_MAGIC)) == _ZIP_MAGIC
        if not is_zip:
            file.seek(0)
            obj = _load_legacy(file)
    if is_zip:
        obj = _load_zip(path)
    return _as_state_dict(obj, path)
