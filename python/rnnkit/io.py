"""Saving and loading modules: one ``.npz`` file, no pickle.

The file is a NumPy ``.npz`` archive (readable with ``numpy.load(path, allow_pickle=False)``) that
holds every entry of the module's :meth:`~rnnkit.module.Module.state_dict` under its own name, plus
one entry ``"__rnnkit__"``: a uint8 array of UTF-8 JSON,

.. code-block:: text

    {"format": "rnnkit", "format_version": 1, "rnnkit_version": "...",
     "module": {"class": "package.module.ClassName", "args": [...], "kwargs": {...}},
     "arrays": {name: {"dtype": "<f4", "shape": [...], "sha256": "..."}}}

``"module"`` holds the constructor arguments every :class:`~rnnkit.module.Module` records, so
:func:`load` rebuilds the module by calling its class again (found by name in
:data:`rnnkit.module.REGISTRY`; nothing from the file is ever imported or executed) and then
copies the weights in. Arguments may be None, bools, ints, floats, strings, lists, tuples, dicts
with string keys, NumPy scalars, NumPy dtypes and scalar types (``np.float32``) and modules
(saved recursively). A ``numpy.random.Generator`` argument is saved as None: the weights come
from the file anyway.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import tempfile
import zipfile
from collections.abc import Mapping
from typing import IO, Any

import numpy as np
import numpy.typing as npt

import rnnkit
from rnnkit.module import REGISTRY, Module, class_name

Array = npt.NDArray[Any]

FORMAT = "rnnkit"
FORMAT_VERSION = 1
META_KEY = "__rnnkit__"

_TAG = "__type__"


# ---------------------------------------------------------------------- saving


def save(module: Module, path: str | os.PathLike[str]) -> None:
    """Save ``module`` (its constructor arguments and its state) to one file at ``path``.

    The file is written under a temporary name in the same directory and renamed over ``path``
    only once complete, so ``path`` always holds either its old contents or the whole new file.
    The path is used as given (no ``.npz`` suffix is added).

    Args:
        module: the module to save.
        path: the file to write (str or path-like).

    Raises:
        TypeError: ``module`` is not a Module, or one of its constructor arguments cannot be saved
            (the message names the argument, e.g. ``module.kwargs['seed']``).
        ValueError: a parameter or buffer is named ``"__rnnkit__"``.
    """
    if not isinstance(module, Module):
        raise TypeError(f"module must be an rnnkit Module; got {type(module).__name__}")
    target = _fspath(path)
    state = module.state_dict()
    if META_KEY in state:
        raise ValueError(
            f"module has a parameter or buffer named {META_KEY!r}, which the file format reserves"
        )
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "rnnkit_version": rnnkit.__version__,
        "module": _encode_module(module, "module"),
        "arrays": {name: _describe(arr) for name, arr in state.items()},
    }
    blob = np.frombuffer(json.dumps(meta, allow_nan=False).encode("utf-8"), dtype=np.uint8)
    _write_atomically(target, {**state, META_KEY: blob})


def _write_atomically(path: str, arrays: Mapping[str, Array]) -> None:
    """Write the ``.npz`` archive to a temporary file beside ``path``, sync it, rename it over ``path``."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = tempfile.NamedTemporaryFile(  # closed and, on failure, removed below
        delete=False, dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp"
    )
    try:
        with tmp:
            _write_npz(tmp, arrays)
            tmp.flush()
            os.fsync(tmp.fileno())
        os.chmod(tmp.name, _file_mode(path))
        os.replace(tmp.name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp.name)
        raise


def _write_npz(file: IO[bytes], arrays: Mapping[str, Array]) -> None:
    """The ``.npz`` layout of ``numpy.savez`` (one ``name.npy`` member per array), written directly
    so that no array name can collide with ``savez``'s own parameter names."""
    with zipfile.ZipFile(file, mode="w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, arr in arrays.items():
            with zf.open(f"{name}.npy", mode="w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asarray(arr), allow_pickle=False)


def _file_mode(path: str) -> int:
    """The permissions for the new file: the old file's, or those a plain ``open`` would give."""
    try:
        return os.stat(path).st_mode & 0o7777
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def _describe(arr: Array) -> dict[str, Any]:
    return {"dtype": arr.dtype.str, "shape": list(arr.shape), "sha256": _sha256(arr)}


def _sha256(arr: Array) -> str:
    return hashlib.sha256(np.asarray(arr, order="C").data).hexdigest()


def _fspath(path: Any) -> str:
    try:
        p = os.fspath(path)
    except TypeError:
        p = None
    if not isinstance(p, str):
        raise TypeError(f"path must be a str or os.PathLike; got {type(path).__name__}")
    return p


def _encode_module(module: Module, where: str) -> dict[str, Any]:
    cls = type(module)
    name = class_name(cls)
    if REGISTRY.get(name) is not cls:
        raise TypeError(f"cannot save {where}: its class {name} is not registered in rnnkit.module.REGISTRY")
    args = getattr(module, "_init_args", ())
    kwargs = getattr(module, "_init_kwargs", {})
    return {
        "class": name,
        "args": [_encode(a, f"{where}.args[{i}]") for i, a in enumerate(args)],
        "kwargs": {k: _encode(v, f"{where}.kwargs[{k!r}]") for k, v in kwargs.items()},
    }


def _encode(value: Any, where: str) -> Any:
    """``value`` as JSON; anything JSON lacks becomes a dict tagged with ``"__type__"``."""
    if isinstance(value, np.generic) and value.dtype.kind in "biuf":  # before float: np.float64 is one
        return {_TAG: "scalar", "dtype": value.dtype.str, "value": _encode(value.item(), where)}
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {_TAG: "float", "value": repr(value)}
    if isinstance(value, list):
        return [_encode(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, tuple):
        return {_TAG: "tuple", "items": [_encode(v, f"{where}[{i}]") for i, v in enumerate(value)]}
    if isinstance(value, dict):
        bad = next((k for k in value if not isinstance(k, str)), None)
        if bad is not None:
            raise TypeError(f"cannot save {where}: dict keys must be str; got key {bad!r}")
        return {_TAG: "dict", "items": {k: _encode(v, f"{where}[{k!r}]") for k, v in value.items()}}
    if isinstance(value, Module):
        return {_TAG: "module", **_encode_module(value, where)}
    if isinstance(value, np.random.Generator):
        return None
    if isinstance(value, np.dtype) and _dtype_round_trips(value):
        return {_TAG: "dtype", "dtype": value.str}
    if isinstance(value, type) and issubclass(value, np.generic) and _scalar_type_round_trips(value):
        return {_TAG: "scalar_type", "dtype": np.dtype(value).str}
    raise TypeError(
        f"cannot save {where}: a value of type {type(value).__module__}.{type(value).__qualname__} "
        "cannot be stored (supported: None, bool, int, float, str, list, tuple, dict with str keys, "
        "NumPy scalars, dtypes and scalar types, Modules, numpy.random.Generator)"
    )


def _dtype_round_trips(dtype: np.dtype[Any]) -> bool:
    return dtype.fields is None and np.dtype(dtype.str) == dtype


def _scalar_type_round_trips(kind: type) -> bool:
    try:
        return np.dtype(kind).type is kind
    except TypeError:  # an abstract type such as np.floating
        return False


# ---------------------------------------------------------------------- loading


def load(path: str | os.PathLike[str]) -> Module:
    """Load a module saved by :func:`save`.

    The module's class must be defined (its Python module imported) before loading: the file
    only names it. The module is rebuilt from its saved constructor arguments, its parameters and
    buffers are loaded (every entry checked), and it is returned in training mode, like a newly
    constructed module (call ``.eval()`` for inference).

    Args:
        path: the file to read (str or path-like).

    Returns:
        The rebuilt module.

    Raises:
        FileNotFoundError: there is no file at ``path``.
        ValueError: the file is not a valid rnnkit file (truncated, corrupted, checksum mismatch),
            was written by a newer rnnkit, names a class that is not defined, or holds arrays
            that do not fit the module.
    """
    source = _fspath(path)
    meta, arrays = _read(source)
    version = meta["format_version"]
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{source} has format version {version} (written by rnnkit {meta.get('rnnkit_version')}); "
            f"this rnnkit {rnnkit.__version__} reads up to version {FORMAT_VERSION}: upgrade rnnkit"
        )
    try:
        module = _build(meta.get("module"), source, "module")
    except (KeyError, TypeError, AttributeError) as e:  # a well-formed file never gets here
        raise ValueError(
            f"{source} is not a valid rnnkit file: its module description is malformed: {e!r}"
        ) from e
    try:
        module.load_state_dict(arrays, strict=True)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{source}: the saved arrays do not fit the rebuilt module: {e}") from e
    return module


def _read(path: str) -> tuple[dict[str, Any], dict[str, Array]]:
    """The metadata and the state arrays of the file at ``path``, each array checked. The arrays
    are left unread (empty) if the file's format version is newer than this rnnkit's."""
    with open(path, "rb") as f:  # a missing file raises FileNotFoundError here
        try:
            npz = np.load(f, allow_pickle=False)
            if not isinstance(npz, np.lib.npyio.NpzFile):
                raise ValueError("it is a single .npy array, not an .npz archive")
            with npz:
                return _parse(npz)
        except (ValueError, EOFError, KeyError, OSError, zipfile.BadZipFile, UnicodeDecodeError) as e:
            raise ValueError(f"{path} is not a valid rnnkit file: {e}") from e


def _parse(npz: np.lib.npyio.NpzFile) -> tuple[dict[str, Any], dict[str, Array]]:
    names = set(npz.files)
    if META_KEY not in names:
        raise ValueError(f"it has no {META_KEY!r} entry")
    meta = json.loads(npz[META_KEY].tobytes().decode("utf-8"))
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"its {META_KEY!r} entry does not mark it as format {FORMAT!r}")
    version = meta.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"format_version must be a positive integer; got {version!r}")
    if version > FORMAT_VERSION:  # its layout may be anything: the caller reports the version
        return meta, {}
    described = meta.get("arrays")
    if not isinstance(described, dict) or set(described) != names - {META_KEY}:
        raise ValueError("its arrays do not match the arrays its metadata lists")
    return meta, {name: _checked(name, npz[name], described[name]) for name in described}


def _checked(name: str, arr: Array, description: Any) -> Array:
    """``arr`` if it has the dtype, shape and SHA-256 its metadata gives."""
    if not isinstance(description, dict):
        raise ValueError(f"its metadata for array {name!r} is not a dict")
    if arr.dtype.str != description.get("dtype") or list(arr.shape) != description.get("shape"):
        raise ValueError(
            f"array {name!r} has dtype {arr.dtype.str} and shape {list(arr.shape)}; its metadata says "
            f"{description.get('dtype')} and {description.get('shape')}"
        )
    if _sha256(arr) != description.get("sha256"):
        raise ValueError(f"array {name!r} does not match its SHA-256 checksum (the file is corrupted)")
    return arr


def _decode(value: Any, path: str, where: str) -> Any:
    """The Python value of an encoded argument."""
    if isinstance(value, list):
        return [_decode(v, path, f"{where}[{i}]") for i, v in enumerate(value)]
    if not isinstance(value, dict):
        return value
    kind = value.get(_TAG)
    if kind == "module":
        return _build(value, path, where)
    if kind == "tuple":
        return tuple(_decode(v, path, f"{where}[{i}]") for i, v in enumerate(value["items"]))
    if kind == "dict":
        return {k: _decode(v, path, f"{where}[{k!r}]") for k, v in value["items"].items()}
    if kind == "float":
        return float(value["value"])
    if kind == "scalar":
        return np.dtype(value["dtype"]).type(_decode(value["value"], path, where))
    if kind == "dtype":
        return np.dtype(value["dtype"])
    if kind == "scalar_type":
        return np.dtype(value["dtype"]).type
    raise ValueError(f"{path} is not a valid rnnkit file: {where} has an unknown encoding {kind!r}")


def _build(config: Any, path: str, where: str) -> Module:
    """The module a saved ``{"class", "args", "kwargs"}`` describes, constructed anew."""
    name = config["class"]
    cls = REGISTRY.get(name) if isinstance(name, str) else None
    if cls is None:
        raise ValueError(
            f"{path}: {where} is of class {name!r}, which is not defined; import the module that "
            "defines it before loading"
        )
    args = _decode(config["args"], path, f"{where}.args")
    kwargs = _decode({_TAG: "dict", "items": config["kwargs"]}, path, f"{where}.kwargs")
    try:
        return cls(*args, **kwargs)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: could not rebuild {where} ({name}) from its saved arguments: {e}") from e
