"""Read the tensors of a whole pickled `torch.nn.Module` (such as OpenAI's DALL-E `encoder.pkl`)
without the package that defined it and without executing any pickled code.

A restricted unpickler resolves only allow-listed globals: module classes become inert records of
their state, tensor-rebuild functions are re-implemented here, and storages are read directly from
the file (zip format) or from the bytes after the pickle (legacy format). Any other global is refused.
"""
from __future__ import annotations

import io
import pickle
import struct
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any, BinaryIO

import torch

_DTYPES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


class UnsafePickleError(Exception):
    """The pickle references something outside the allow-list."""


class ModuleRecord:
    """Stands in for an allow-listed class: keeps the pickled state and the class name, runs nothing."""

    qualname = ""

    def __setstate__(self, state: Any) -> None:
        self.__dict__["state"] = state

    def __repr__(self) -> str:
        return f"<{self.qualname}>"


def _record_class(qualname: str) -> type:
    return type("Record", (ModuleRecord,), {"qualname": qualname})


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    return torch.as_strided(storage, size, stride, offset)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *rest):
    return data


def _device(*args):
    return str(args[0]) if args else "cpu"


class _StorageType:
    def __init__(self, name: str) -> None:
        self.dtype = _DTYPES[name]


class RestrictedUnpickler(pickle.Unpickler):
    """Allow-list: containers, tensor rebuilds, storage types, and module classes from the given
    prefixes (as inert records)."""

    SAFE = {
        ("collections", "OrderedDict"): OrderedDict,
        ("builtins", "set"): set,
        ("__builtin__", "set"): set,  # protocol-2 pickles name builtins this way
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
        ("torch", "device"): _device,
    }

    def __init__(self, file: BinaryIO, load_storage, module_prefixes: tuple[str, ...]) -> None:
        super().__init__(file)
        self._load_storage = load_storage
        self._prefixes = module_prefixes

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.SAFE:
            return self.SAFE[(module, name)]
        if module == "torch" and name in _DTYPES:
            return _StorageType(name)
        if module.startswith(self._prefixes) and name[:1].isupper():
            return _record_class(f"{module}.{name}")
        raise UnsafePickleError(f"{module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        if isinstance(pid, tuple) and pid and pid[0] == "module" and isinstance(pid[1], type) \
                and issubclass(pid[1], ModuleRecord):
            return pid[1]  # legacy format records each module class with its source text; only the class is used
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise UnsafePickleError(f"persistent id {str(pid)[:80]}")
        _, storage_type, key, _location, numel = pid[:5]
        dtype = storage_type.dtype if isinstance(storage_type, _StorageType) else torch.uint8
        return self._load_storage(str(key), dtype, int(numel))


class _PlainUnpickler(pickle.Unpickler):
    """For the legacy header and key list: plain data only, no globals at all."""

    def find_class(self, module: str, name: str) -> Any:
        raise UnsafePickleError(f"{module}.{name}")


def _zip_load(path: Path, prefixes: tuple[str, ...]) -> Any:
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        root = names[0].split("/")[0]
        cache: dict[str, torch.Tensor] = {}

        def load_storage(key: str, dtype: torch.dtype, numel: int) -> torch.Tensor:
            if key not in cache:
                raw = bytearray(archive.read(f"{root}/data/{key}"))
                cache[key] = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
            return cache[key]

        with archive.open(f"{root}/data.pkl") as f:
            return RestrictedUnpickler(io.BytesIO(f.read()), load_storage, prefixes).load()


def _legacy_load(path: Path, prefixes: tuple[str, ...]) -> Any:
    """Legacy format: magic, protocol, sys info, the object pickle, storage keys, then each
    storage as an int64 element count followed by raw bytes."""
    file_size = path.stat().st_size
    with open(path, "rb") as f:
        header = _PlainUnpickler(f)
        if header.load() != _LEGACY_MAGIC:
            raise ValueError("not a torch legacy file")
        header.load()  # protocol version
        header.load()  # sys info
        pending: dict[str, tuple[torch.dtype, int]] = {}
        placeholders: dict[str, torch.Tensor] = {}

        def load_storage(key: str, dtype: torch.dtype, numel: int) -> torch.Tensor:
            if key not in placeholders:
                # a storage cannot hold more bytes than the file: a crafted count allocates nothing
                if numel < 0 or numel * torch.empty(0, dtype=dtype).element_size() > file_size:
                    raise ValueError(f"a storage of {numel} elements cannot fit in a {file_size}-byte file")
                placeholders[key] = torch.empty(numel, dtype=dtype)
                pending[key] = (dtype, numel)
            return placeholders[key]

        obj = RestrictedUnpickler(f, load_storage, prefixes).load()
        keys = _PlainUnpickler(f).load()
        for key in keys:
            (count,) = struct.unpack("<q", f.read(8))
            dtype, numel = pending[key]
            size = torch.empty(0, dtype=dtype).element_size()
            if count != numel:
                raise ValueError(f"storage {key} declares {numel} elements but holds {count}")
            data = bytearray(f.read(count * size))
            placeholders[key].copy_(torch.frombuffer(data, dtype=dtype) if data else torch.empty(0, dtype=dtype))
        return obj


def load_module_pickle(path: str | Path, module_prefixes: tuple[str, ...]) -> Any:
    """Unpickle a whole saved module into `ModuleRecord`s; raises `UnsafePickleError` on any
    global outside the allow-list and `ValueError` when the file is not a torch save at all."""
    path = Path(path)
    if zipfile.is_zipfile(path):
        return _zip_load(path, module_prefixes)
    return _legacy_load(path, module_prefixes)


def record_state(record: Any) -> dict[str, Any]:
    state = getattr(record, "state", None)
    if isinstance(state, tuple):  # (dict, slots) form
        state = state[0]
    return state if isinstance(state, dict) else {}


def named_parameters(record: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """Walk `_parameters` / `_buffers` / `_modules` of a record tree like `Module.state_dict`."""
    state = record_state(record)
    out: dict[str, torch.Tensor] = {}
    for group in ("_parameters", "_buffers"):
        for name, value in (state.get(group) or {}).items():
            if isinstance(value, torch.Tensor):
                out[prefix + name] = value
    for name, child in (state.get("_modules") or {}).items():
        if child is not None:
            out.update(named_parameters(child, f"{prefix}{name}."))
    return out
