"""A torch-free, code-free reader of PyTorch zip archives (`.pt`, `.pth`, `.bin`).

Two kinds of archive share one container format (a zip file with one top-level folder):

* plain ``torch.save`` files (e.g. a state dict, diffusers' ``diffusion_pytorch_model.bin``):
  ``<prefix>/data.pkl`` pickles the saved object, tensors are ``_rebuild_tensor_v2`` calls whose
  storages are *persistent ids* pointing at ``<prefix>/data/<key>`` (raw little-endian bytes);
* TorchScript archives (``torch.jit.save``, e.g. the FID network ``default_1.pt``): the same
  ``data.pkl`` / ``data/<key>`` layout, but the pickle holds the module *object tree*: every
  module is a ``__torch__.<qualified.Class>`` object whose state dict holds its parameters,
  buffers, sub-modules and plain attributes (``stride``, ``padding``, ...). The ``code/`` folder
  holds the TorchScript source, which we never need to run.

``pickle.load`` on such a file would import and call whatever globals the pickle names, i.e. run
arbitrary code. Here the unpickler resolves globals only from a small whitelist of harmless
stand-ins (tensor rebuilders implemented with numpy, ``OrderedDict``, storage dtype markers,
``__torch__`` classes mapped to inert records); any other global raises
:class:`UnsafeArchiveError` *before* anything is called.

Public API: :func:`load_tensors`, :func:`load_object`, :func:`sha1_of_file`,
:class:`ScriptObject`, :class:`NamespaceRecord`, :class:`UnsafeArchiveError`,
:class:`ArchiveFormatError`.
"""

from __future__ import annotations

import collections
import hashlib
import io
import os
import pickle
import zipfile
from typing import Any, Callable

import numpy as np

try:  # ml_dtypes ships with jax; keep bfloat16 tensors exact when it is there.
  import ml_dtypes
  _BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover - jax always brings ml_dtypes
  ml_dtypes = None
  _BFLOAT16 = None

__all__ = [
    "ArchiveFormatError",
    "NamespaceRecord",
    "ScriptObject",
    "UnsafeArchiveError",
    "load_object",
    "load_tensors",
    "sha1_of_file",
]


class UnsafeArchiveError(ValueError):
  """The archive's pickle names a global outside the whitelist (it could run code)."""


class ArchiveFormatError(ValueError):
  """The file is not a readable torch zip archive (not a zip, truncated, corrupt, ...)."""


# --------------------------------------------------------------------------------------------
# Storage dtypes. ``torch.save`` records each storage by its legacy typed-storage class name
# (``torch.FloatStorage`` ...), newer versions may use ``torch.UntypedStorage`` (raw bytes) plus
# an explicit dtype in ``_rebuild_tensor_v3``. We map both to numpy dtypes.
# --------------------------------------------------------------------------------------------

class _StorageType:
  """Inert stand-in for a ``torch.*Storage`` class: only carries the element dtype."""

  def __init__(self, name: str, dtype: np.dtype | None):
    self.name = name
    self.dtype = dtype

  def __repr__(self):
    return f"<storage type torch.{self.name}>"


class _TorchDType:
  """Inert stand-in for a ``torch.<dtype>`` object appearing in a pickle (``_rebuild_tensor_v3``)."""

  def __init__(self, name: str, dtype: np.dtype | None):
    self.name = name
    self.dtype = dtype

  def __repr__(self):
    return f"<dtype torch.{self.name}>"


# name -> numpy dtype (None = known to torch but not representable here).
_STORAGE_DTYPES: dict[str, np.dtype | None] = {
    "DoubleStorage": np.dtype("<f8"),
    "FloatStorage": np.dtype("<f4"),
    "HalfStorage": np.dtype("<f2"),
    "BFloat16Storage": _BFLOAT16,
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
    "ComplexFloatStorage": np.dtype("<c8"),
    "ComplexDoubleStorage": np.dtype("<c16"),
    "UntypedStorage": np.dtype("u1"),
}

_TORCH_DTYPES: dict[str, np.dtype | None] = {
    "float64": np.dtype("<f8"), "double": np.dtype("<f8"),
    "float32": np.dtype("<f4"), "float": np.dtype("<f4"),
    "float16": np.dtype("<f2"), "half": np.dtype("<f2"),
    "bfloat16": _BFLOAT16,
    "int64": np.dtype("<i8"), "long": np.dtype("<i8"),
    "int32": np.dtype("<i4"), "int": np.dtype("<i4"),
    "int16": np.dtype("<i2"), "short": np.dtype("<i2"),
    "int8": np.dtype("i1"), "uint8": np.dtype("u1"),
    "uint16": np.dtype("<u2"), "uint32": np.dtype("<u4"), "uint64": np.dtype("<u8"),
    "bool": np.dtype("?"),
    "complex64": np.dtype("<c8"), "complex128": np.dtype("<c16"),
}


# --------------------------------------------------------------------------------------------
# Records for TorchScript objects.
# --------------------------------------------------------------------------------------------

class ScriptObject:
  """An inert record standing in for a ``__torch__.*`` object (a TorchScript module).

  ``qualname`` is the TorchScript class name (e.g. ``__torch__.inceptionv3.Conv2dLayer``),
  ``state`` whatever the pickle's BUILD opcode supplied (a dict of attributes for modules).
  """

  qualname = "__torch__.?"
  args: tuple = ()
  state: Any = None  # NEWOBJ skips __init__, so defaults live on the class

  def __init__(self, *args, **kwargs):  # NEWOBJ passes no args; REDUCE might. Keep both inert.
    self.args = args
    self.state: Any = None

  def __setstate__(self, state):
    # Called by the pickle BUILD opcode: just keep the state, never interpret it as code.
    self.state = state

  @property
  def attributes(self) -> dict:
    return self.state if isinstance(self.state, dict) else {}

  def __repr__(self):
    keys = ", ".join(sorted(self.attributes)) if isinstance(self.state, dict) else ""
    return f"ScriptObject({self.qualname}; {keys})"


_SCRIPT_CLASSES: dict[str, type] = {}


def _script_class(qualname: str) -> type:
  """One subclass of ScriptObject per TorchScript class name (so NEWOBJ gets a real class)."""
  cls = _SCRIPT_CLASSES.get(qualname)
  if cls is None:
    cls = type(qualname.rsplit(".", 1)[-1], (ScriptObject,), {"qualname": qualname})
    _SCRIPT_CLASSES[qualname] = cls
  return cls


class NamespaceRecord:
  """An inert record standing in for a pickled ``argparse.Namespace`` (a training script's
  command-line arguments). ``attributes`` holds the values the pickle's BUILD opcode supplied;
  nothing of argparse is imported or called."""

  state: Any = None  # NEWOBJ skips __init__, so the default lives on the class

  def __init__(self, *args, **kwargs):  # REDUCE might pass arguments: keep them inert
    del args
    self.state = dict(kwargs)

  def __setstate__(self, state):
    self.state = state

  @property
  def attributes(self) -> dict:
    return dict(self.state) if isinstance(self.state, dict) else {}

  def __repr__(self):
    return f"NamespaceRecord({', '.join(f'{k}={v!r}' for k, v in self.attributes.items())})"


# --------------------------------------------------------------------------------------------
# Tensor rebuilding (numpy implementations of the whitelisted torch helpers).
# --------------------------------------------------------------------------------------------

class _Storage:
  """A storage read from ``data/<key>``: a flat numpy array of its element dtype."""

  def __init__(self, array: np.ndarray, key: str):
    self.array = array
    self.key = key


def _as_int_tuple(x, what: str) -> tuple[int, ...]:
  if isinstance(x, int):  # torch accepts a bare int for 1-D sizes in some old pickles
    x = (x,)
  if not isinstance(x, (tuple, list)) or not all(isinstance(v, int) for v in x):
    raise ArchiveFormatError(f"tensor {what} must be a tuple of ints, got {x!r}")
  return tuple(int(v) for v in x)


def _view(storage: _Storage, offset: int, size, stride, dtype: np.dtype | None = None) -> np.ndarray:
  """Materialise ``storage[offset:]`` viewed with (size, stride) as an owned, contiguous array."""
  if not isinstance(storage, _Storage):
    raise ArchiveFormatError(f"tensor storage must come from data/<key>, got {storage!r}")
  size = _as_int_tuple(size, "size")
  stride = _as_int_tuple(stride, "stride")
  if len(size) != len(stride):
    raise ArchiveFormatError(f"tensor size {size} and stride {stride} differ in rank")
  if not isinstance(offset, int) or offset < 0 or any(s < 0 for s in size) or any(s < 0 for s in stride):
    raise ArchiveFormatError(f"bad tensor view: offset={offset!r} size={size} stride={stride}")
  flat = storage.array
  if dtype is not None and dtype != flat.dtype:
    # _rebuild_tensor_v3 over an untyped (byte) storage: reinterpret the bytes.
    if flat.nbytes % dtype.itemsize:
      raise ArchiveFormatError(f"storage data/{storage.key} has {flat.nbytes} bytes, "
                               f"not a multiple of {dtype} ({dtype.itemsize} bytes)")
    flat = flat.view(dtype)
  if any(s == 0 for s in size):
    return np.empty(size, dtype=flat.dtype)
  last = offset + sum((n - 1) * s for n, s in zip(size, stride))
  if last >= flat.size:
    raise ArchiveFormatError(
        f"tensor view (offset {offset}, size {size}, stride {stride}) reads element {last} "
        f"of storage data/{storage.key}, which has only {flat.size} elements (corrupt archive?)")
  itemsize = flat.dtype.itemsize
  view = np.lib.stride_tricks.as_strided(
      flat[offset:], shape=size, strides=tuple(s * itemsize for s in stride), writeable=False)
  # Copy: the result owns its memory, is C-contiguous and does not pin the whole storage.
  return np.array(view, copy=True, order="C")


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
  del requires_grad, backward_hooks, metadata  # training-time details, irrelevant for arrays
  return _view(storage, storage_offset, size, stride)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks,
                       dtype, metadata=None):
  del requires_grad, backward_hooks, metadata
  if not isinstance(dtype, _TorchDType):
    raise ArchiveFormatError(f"_rebuild_tensor_v3 expects a torch dtype, got {dtype!r}")
  if dtype.dtype is None:
    raise ArchiveFormatError(f"tensor dtype torch.{dtype.name} cannot be represented in numpy")
  return _view(storage, storage_offset, size, stride, dtype=dtype.dtype)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *unused):
  # nn.Parameter wraps a tensor; for us the parameter *is* its data.
  del requires_grad, backward_hooks, unused
  if not isinstance(data, np.ndarray):
    raise ArchiveFormatError(f"_rebuild_parameter expects a tensor, got {type(data).__name__}")
  return data


def _build_list(values=()):
  # torch.jit._pickle.build_{int,double,bool,tensor}list: typed lists in TorchScript pickles.
  return list(values)


def _restore_type_tag(value, type_str=None):
  del type_str  # TorchScript keeps the static type of a list/dict here; data is unchanged
  return value


# The whitelist: (module, name) -> harmless object returned by find_class.
_SAFE_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("argparse", "Namespace"): NamespaceRecord,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch.jit._pickle", "build_intlist"): _build_list,
    ("torch.jit._pickle", "build_doublelist"): _build_list,
    ("torch.jit._pickle", "build_boollist"): _build_list,
    ("torch.jit._pickle", "build_tensorlist"): _build_list,
    ("torch.jit._pickle", "restore_type_tag"): _restore_type_tag,
}
_SAFE_GLOBALS.update({("torch", n): _StorageType(n, d) for n, d in _STORAGE_DTYPES.items()})
_SAFE_GLOBALS.update({("torch", n): _TorchDType(n, d) for n, d in _TORCH_DTYPES.items()})


class _RestrictedUnpickler(pickle.Unpickler):
  """An Unpickler that can only reach the whitelist above; storages come from the zip."""

  def __init__(self, data: bytes, read_storage: Callable[[str, _StorageType], _Storage]):
    super().__init__(io.BytesIO(data))
    self._read_storage = read_storage

  def find_class(self, module: str, name: str):
    if module.startswith("__torch__.") or module == "__torch__":
      # TorchScript classes: never import anything, build an inert record type instead.
      return _script_class(f"{module}.{name}")
    try:
      return _SAFE_GLOBALS[(module, name)]
    except KeyError:
      raise UnsafeArchiveError(
          f"refusing to load global '{module}.{name}' from the archive's pickle: only tensor "
          f"data, OrderedDict and TorchScript module records are allowed (loading it could "
          f"execute arbitrary code)") from None

  def persistent_load(self, pid):
    # torch.save writes ('storage', storage_type, key, location, numel) for every storage.
    if not (isinstance(pid, tuple) and len(pid) >= 4 and pid[0] == "storage"):
      raise ArchiveFormatError(f"unsupported persistent id in archive pickle: {pid!r}")
    storage_type, key = pid[1], pid[2]
    if not isinstance(storage_type, _StorageType):
      raise ArchiveFormatError(f"persistent id names {storage_type!r}, not a torch storage type")
    if not isinstance(key, str):
      raise ArchiveFormatError(f"storage key must be a string, got {key!r}")
    return self._read_storage(key, storage_type)


# --------------------------------------------------------------------------------------------
# The zip container.
# --------------------------------------------------------------------------------------------

def _open_zip(path: str | os.PathLike) -> zipfile.ZipFile:
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"torch archive not found: {path}")
  try:
    return zipfile.ZipFile(path)
  except zipfile.BadZipFile as e:
    with open(path, "rb") as f:
      head = f.read(4)
    hint = ""
    if head[:2] == b"\x80\x02" or head[:1] == b"\x80":
      hint = (" It looks like a legacy (pre-1.6, non-zip) torch.save file; re-save it with a "
              "recent torch (torch.save(obj, path)) to get the zip format.")
    elif head == b"PK\x03\x04":
      hint = " It starts like a zip file, so it is probably truncated or corrupt (re-download it)."
    raise ArchiveFormatError(f"{path} is not a readable torch zip archive ({e}).{hint}") from e


def _find_pickle(zf: zipfile.ZipFile, path: str) -> tuple[str, str]:
  """Returns (prefix, name of data.pkl). The prefix is the archive's single top-level folder."""
  names = zf.namelist()
  candidates = [n for n in names if n == "data.pkl" or (n.endswith("/data.pkl") and n.count("/") == 1)]
  if len(candidates) != 1:
    raise ArchiveFormatError(
        f"{path}: expected exactly one '<prefix>/data.pkl' in the zip, found {candidates or 'none'}; "
        f"is this a torch.save / torch.jit.save archive?")
  pkl = candidates[0]
  return pkl[: -len("data.pkl")], pkl


def _read_member(zf: zipfile.ZipFile, name: str, path: str) -> bytes:
  try:
    return zf.read(name)
  except KeyError:
    raise ArchiveFormatError(f"{path}: archive member '{name}' is missing (truncated archive?)") from None
  except (zipfile.BadZipFile, EOFError, OSError, ValueError) as e:  # CRC error, truncated data
    raise ArchiveFormatError(f"{path}: cannot read archive member '{name}' ({e}); "
                             f"the file is probably truncated or corrupt") from e


def load_object(path: str | os.PathLike) -> Any:
  """Unpickles the archive's ``data.pkl`` safely; tensors come back as numpy arrays.

  Returns whatever was saved: for a state dict an ``OrderedDict`` of arrays, for a TorchScript
  archive the root :class:`ScriptObject` (its ``attributes`` hold sub-modules, tensors and plain
  attributes such as ``stride``/``padding``).

  Raises:
    FileNotFoundError: ``path`` does not exist.
    ArchiveFormatError: not a zip, truncated, corrupt, or an unsupported layout.
    UnsafeArchiveError: the pickle names a global outside the whitelist (nothing is executed).
  """
  path = os.fspath(path)
  with _open_zip(path) as zf:
    prefix, pkl = _find_pickle(zf, path)
    big_endian = False
    if f"{prefix}byteorder" in zf.namelist():
      big_endian = _read_member(zf, f"{prefix}byteorder", path).strip() == b"big"
    cache: dict[str, _Storage] = {}

    def read_storage(key: str, storage_type: _StorageType) -> _Storage:
      # Several tensors (views) may share a storage: read each data/<key> once.
      if key in cache:
        return cache[key]
      if storage_type.dtype is None:
        raise ArchiveFormatError(f"{path}: storage type torch.{storage_type.name} needs ml_dtypes "
                                 f"(pip install ml_dtypes) or is not representable in numpy")
      raw = _read_member(zf, f"{prefix}data/{key}", path)
      dtype = storage_type.dtype.newbyteorder(">") if big_endian else storage_type.dtype
      if len(raw) % dtype.itemsize:
        raise ArchiveFormatError(f"{path}: storage data/{key} has {len(raw)} bytes, not a multiple "
                                 f"of its element size {dtype.itemsize} (truncated?)")
      arr = np.frombuffer(raw, dtype=dtype)
      if big_endian:
        arr = arr.astype(storage_type.dtype)
      cache[key] = _Storage(arr, key)
      return cache[key]

    data = _read_member(zf, pkl, path)
    try:
      return _RestrictedUnpickler(data, read_storage).load()
    except (UnsafeArchiveError, ArchiveFormatError):
      raise
    except (pickle.UnpicklingError, EOFError, TypeError, AttributeError, IndexError) as e:
      raise ArchiveFormatError(f"{path}: cannot parse {pkl} ({type(e).__name__}: {e})") from e


def _flatten(obj: Any, prefix: str, out: dict[str, np.ndarray], seen: set[int]) -> None:
  """Collects arrays from nested dicts / ScriptObjects / lists under dotted names."""
  if isinstance(obj, np.ndarray):
    out[prefix] = obj
    return
  if id(obj) in seen:  # shared sub-objects: name them where first met, never loop
    return
  if isinstance(obj, ScriptObject):
    seen.add(id(obj))
    _flatten(obj.attributes, prefix, out, seen)
  elif isinstance(obj, dict):
    seen.add(id(obj))
    for k, v in obj.items():
      _flatten(v, f"{prefix}.{k}" if prefix else str(k), out, seen)
  elif isinstance(obj, (list, tuple)):
    seen.add(id(obj))
    for i, v in enumerate(obj):
      _flatten(v, f"{prefix}.{i}" if prefix else str(i), out, seen)
  # Anything else (ints, strings, None, flags) is not a tensor: skipped.


def load_tensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads every tensor of a torch archive as ``{dotted.name: numpy array}``.

  * state dicts (possibly nested, e.g. ``{'model': {...}}``): keys joined with dots;
  * TorchScript archives: module attribute paths, e.g. ``net.layers.conv.weight``;
  * a bare saved tensor: the single key ``""``.

  Dtypes are kept (bfloat16 as ``ml_dtypes.bfloat16``); arrays are C-contiguous copies with the
  tensor's logical shape, whatever its strides / storage offset in the archive. Never executes
  pickled code (see :func:`load_object` for the errors raised).
  """
  out: dict[str, np.ndarray] = {}
  _flatten(load_object(path), "", out, set())
  return out


def sha1_of_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
  """Hex sha1 of a file's bytes, read in chunks (weights files are ~100 MB)."""
  h = hashlib.sha1()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(chunk_size), b""):
      h.update(chunk)
  return h.hexdigest()
