"""The one file layer: every result file is read and written here, local or ``gs://``.

Everything goes through `etils.epath`, so a workdir may be a local directory or any URI epath
opens (``gs://`` through TensorFlow's gfile or gcsfs). Writes are atomic: the bytes go to a
temporary sibling that is renamed over the target only when complete, so a killed run never
leaves a half-written result that a restart would trust. (On object stores a rename is a copy
then a delete, but the copy is whole-object atomic: a reader sees the old or the new file.)
Local writes are also fsynced before the rename, so a finished record survives a power cut.

Orbax checkpoints (parameters, optimiser state) are not files of this layer: orbax writes
them through epath itself.

Several processes (a pod slice, several GPU hosts): **process 0 is the one writer.** The writes
here (files, lines, removals) do nothing on the others, which run the same program and so make
the same calls; code that reads back what this run wrote calls `sync` first, from a point every
process reaches, so the reader sees process 0's finished file. That needs a workdir every
process sees (gs:// or a shared file system), as orbax's multi-host checkpoints do. Copies of
backbones to a process's local disk (`copy_tree`) and directories are made on every process.
"""

from __future__ import annotations

import io
import json
import os
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
  from etils import epath


def is_writer() -> bool:
  """Whether this process writes result files (process 0; the only process of a plain run)."""
  import jax  # pylint: disable=g-import-not-at-top
  return jax.process_index() == 0


def sync(tag: str) -> None:
  """Every process waits here until all have arrived (a no-op in one process): after process 0's
  writes before this point, the others read them. ``tag`` names the point (the same on all)."""
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(tag)


def path(p) -> 'epath.Path':
  """``p`` as an `etils.epath.Path` (imported lazily: keeps light modules light)."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  return epath.Path(p)


def join(root, *names: str) -> str:
  """``root/names...`` as a string, also for ``gs://`` roots."""
  return str(path(root).joinpath(*names))


def is_remote(p) -> bool:
  return '://' in str(p)


def exists(p) -> bool:
  return path(p).exists()


def isfile(p) -> bool:
  p = path(p)
  return p.exists() and not p.is_dir()


def isdir(p) -> bool:
  return path(p).is_dir()


def listdir(p) -> list[str]:
  """Sorted names in directory ``p``; [] if it does not exist."""
  p = path(p)
  if not p.is_dir():
    return []
  return sorted(c.name for c in p.iterdir())


def makedirs(p) -> None:
  path(p).mkdir(parents=True, exist_ok=True)


def remove(p) -> None:
  """Deletes file ``p`` if it exists (process 0 only)."""
  if not is_writer():
    return
  p = path(p)
  if p.exists():
    p.unlink()


def rmtree(p) -> None:
  """Deletes directory ``p`` and everything in it, if it exists."""
  p = path(p)
  if p.exists():
    p.rmtree()


# ---------------------------------------------------------------------------
# Reading.
# ---------------------------------------------------------------------------


def read_bytes(p) -> bytes:
  return path(p).read_bytes()


def read_text(p) -> str:
  return path(p).read_text()


def read_json(p) -> Any:
  return json.loads(read_text(p))


def read_json_lines(p) -> list[Any]:
  """The records of a JSON-lines file; [] if it does not exist. A line that does not parse
  (the partial last line of a killed writer) is skipped."""
  if not exists(p):
    return []
  out = []
  for line in read_text(p).splitlines():
    if line.strip():
      try:
        out.append(json.loads(line))
      except json.JSONDecodeError:
        continue
  return out


def load_npz(p) -> dict[str, np.ndarray]:
  """Every array of an .npz (read whole: np.load needs a seekable file, gfile streams are not)."""
  with np.load(io.BytesIO(read_bytes(p)), allow_pickle=False) as z:
    return {k: z[k] for k in z.files}


# ---------------------------------------------------------------------------
# Writing (atomic).
# ---------------------------------------------------------------------------


def write_bytes(p, data: bytes) -> None:
  """Writes ``data`` to ``p`` atomically (temporary sibling, then rename); makes the parents.
  Process 0 only (see the module docstring)."""
  if not is_writer():
    return
  p = path(p)
  p.parent.mkdir(parents=True, exist_ok=True)
  tmp = p.parent / (p.name + '.tmp')
  try:
    with tmp.open('wb') as f:
      f.write(data)
      if not is_remote(p):
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(p)
  except BaseException:
    if tmp.exists():
      tmp.unlink()
    raise


def write_text(p, text: str) -> None:
  write_bytes(p, text.encode('utf-8'))


def _json_default(o):
  if isinstance(o, (np.floating, np.integer, np.bool_)):
    return o.item()
  if isinstance(o, np.ndarray):
    return o.tolist()
  raise TypeError(f'not JSON serialisable: {type(o).__name__}')


def to_json(obj, indent: int | None = 1) -> str:
  """The text every JSON result file holds (numpy scalars and arrays as plain JSON)."""
  return json.dumps(obj, indent=indent, default=_json_default)


def write_json(p, obj) -> None:
  """``obj`` as indented JSON at ``p``, atomically."""
  write_text(p, to_json(obj))


def save_npz(p, **arrays) -> None:
  """np.savez of ``arrays`` to ``p``, atomically."""
  buf = io.BytesIO()
  np.savez(buf, **arrays)
  write_bytes(p, buf.getvalue())


def append_line(p, line: str) -> None:
  """Appends one line (a JSON-lines record) to ``p``, durably.

  Locally an append + fsync: a crash leaves at most a partial last line, which
  `read_json_lines` skips. Objects on ``gs://`` cannot be appended to, so there the file is
  rewritten whole (atomically); JSON-lines files here hold tens of records.
  """
  if not is_writer():
    return
  if not line.endswith('\n'):
    line += '\n'
  if is_remote(p):
    old = read_text(p) if exists(p) else ''
    if old and not old.endswith('\n'):
      old += '\n'
    write_text(p, old + line)
    return
  p = path(p)
  p.parent.mkdir(parents=True, exist_ok=True)
  with open(os.fspath(p), 'a') as f:
    f.write(line)
    f.flush()
    os.fsync(f.fileno())


# ---------------------------------------------------------------------------
# Directory trees (backbones between a gs:// workdir and local disk).
# ---------------------------------------------------------------------------


def copy_tree(src, dst, replace: bool = False) -> None:
  """Copies directory ``src`` into ``dst`` (local <-> gs://); ``replace`` deletes ``dst`` first."""
  src, dst = path(src), path(dst)
  if replace:
    rmtree(dst)
  for root, _, names in src.walk():
    root = path(root)
    out = dst / root.relative_to(src) if root != src else dst
    out.mkdir(parents=True, exist_ok=True)
    for name in names:
      # Bytes through each side's own backend: epath's copy picks one backend for both ends.
      (out / name).write_bytes((root / name).read_bytes())
