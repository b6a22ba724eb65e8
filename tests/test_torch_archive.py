"""Tests for lees_jax.torch_archive: safety (no pickled code runs), format errors, and exact
round trips of tensors written by torch.save / torch.jit.save (those need CPU torch)."""

import hashlib
import os
import pickle
import zipfile

import numpy as np
import pytest

from conftest import fid_weights_path
from lees_jax import torch_archive
from lees_jax.torch_archive import ArchiveFormatError, UnsafeArchiveError


def _zip_with_pickle(path, payload: bytes, prefix="archive/"):
  with zipfile.ZipFile(path, "w") as zf:
    zf.writestr(f"{prefix}data.pkl", payload)
    zf.writestr(f"{prefix}version", "3\n")


# --------------------------------------------------------------------------------------------
# Safety: a pickle that would run code is refused before anything runs.
# --------------------------------------------------------------------------------------------

class _RunsShell:
  """Pickles to os.system(<command>): what a malicious checkpoint would contain."""

  def __init__(self, command):
    self.command = command

  def __reduce__(self):
    return (os.system, (self.command,))


class _RunsEval:
  def __reduce__(self):
    return (eval, ("__import__('os').system('true')",))


@pytest.mark.parametrize("loader", [torch_archive.load_tensors, torch_archive.load_object])
def test_code_execution_payload_is_refused(tmp_path, loader):
  marker = tmp_path / "pwned"
  payload = pickle.dumps({"weight": _RunsShell(f"touch {marker}")}, protocol=2)
  archive = tmp_path / "evil.pt"
  _zip_with_pickle(archive, payload)
  with pytest.raises(UnsafeArchiveError, match=r"system") as info:
    loader(archive)
  assert isinstance(info.value, ValueError)
  assert not marker.exists(), "the pickled os.system call was executed"


def test_eval_payload_and_unknown_torch_globals_are_refused(tmp_path):
  archive = tmp_path / "evil.pt"
  _zip_with_pickle(archive, pickle.dumps([_RunsEval()], protocol=2))
  with pytest.raises(UnsafeArchiveError, match=r"(__builtin__|builtins)\.eval"):
    torch_archive.load_tensors(archive)

  # A torch-looking global that is not on the whitelist is refused by name too.
  payload = b"\x80\x02ctorch.serialization\nload\nq\x00."
  _zip_with_pickle(archive, payload)
  with pytest.raises(UnsafeArchiveError, match=r"torch\.serialization\.load"):
    torch_archive.load_tensors(archive)


def test_torchscript_records_are_inert(tmp_path):
  # A __torch__ class is mapped to a record; calling it via REDUCE does not import anything.
  payload = b"\x80\x02c__torch__.os\nsystem\nq\x00X\x04\x00\x00\x00trueq\x01\x85q\x02Rq\x03."
  archive = tmp_path / "record.pt"
  _zip_with_pickle(archive, payload)
  obj = torch_archive.load_object(archive)
  assert isinstance(obj, torch_archive.ScriptObject)
  assert obj.qualname == "__torch__.os.system"


def test_argparse_namespace_is_an_inert_record(tmp_path):
  """Training checkpoints (DiT's train.py) pickle their argparse.Namespace next to the weights."""
  import argparse
  archive = tmp_path / "train.pt"
  args = argparse.Namespace(model="DiT-XL/2", image_size=256)
  _zip_with_pickle(archive, pickle.dumps({"args": args, "n": 1}, protocol=2))
  obj = torch_archive.load_object(archive)
  assert isinstance(obj["args"], torch_archive.NamespaceRecord)
  assert obj["args"].attributes == {"model": "DiT-XL/2", "image_size": 256}
  assert torch_archive.load_tensors(archive) == {}
  # Its REDUCE form (a call with arguments) stays inert as well.
  payload = b"\x80\x02cargparse\nNamespace\nq\x00X\x04\x00\x00\x00trueq\x01\x85q\x02Rq\x03."
  _zip_with_pickle(archive, payload)
  assert torch_archive.load_object(archive).attributes == {}


# --------------------------------------------------------------------------------------------
# Format errors.
# --------------------------------------------------------------------------------------------

def test_not_a_zip_missing_and_no_pickle(tmp_path):
  bad = tmp_path / "notes.pt"
  bad.write_bytes(b"definitely not a zip file")
  with pytest.raises(ArchiveFormatError, match="not a readable torch zip archive"):
    torch_archive.load_tensors(bad)

  legacy = tmp_path / "legacy.pt"
  legacy.write_bytes(pickle.dumps({"a": 1}, protocol=2))
  with pytest.raises(ArchiveFormatError, match="legacy"):
    torch_archive.load_tensors(legacy)

  with pytest.raises(FileNotFoundError):
    torch_archive.load_tensors(tmp_path / "absent.pt")

  empty = tmp_path / "empty.pt"
  with zipfile.ZipFile(empty, "w") as zf:
    zf.writestr("archive/version", "3\n")
  with pytest.raises(ArchiveFormatError, match="data.pkl"):
    torch_archive.load_tensors(empty)


def test_truncated_archive(tmp_path):
  torch = pytest.importorskip("torch", reason="CPU torch needed to write a real archive")
  full = tmp_path / "full.pt"
  torch.save({"w": torch.arange(100_000, dtype=torch.float32)}, full)
  data = full.read_bytes()
  cut = tmp_path / "cut.pt"
  cut.write_bytes(data[: len(data) // 2])
  with pytest.raises(ArchiveFormatError, match="truncated|corrupt"):
    torch_archive.load_tensors(cut)


def test_sha1_of_file(tmp_path):
  p = tmp_path / "blob"
  data = os.urandom(3 * (1 << 20) + 17)  # spans several read chunks
  p.write_bytes(data)
  assert torch_archive.sha1_of_file(p) == hashlib.sha1(data).hexdigest()


# --------------------------------------------------------------------------------------------
# Round trips through torch.save / torch.jit.save.
# --------------------------------------------------------------------------------------------

def _as_numpy(t):
  import torch
  if t.dtype == torch.bfloat16:
    return t.float().numpy()
  return t.detach().numpy()


def test_state_dict_round_trip(tmp_path):
  torch = pytest.importorskip("torch", reason="CPU torch needed to write archives")
  g = torch.Generator().manual_seed(0)
  base = torch.randn(6, 5, generator=g)
  big = torch.arange(40, dtype=torch.int64)
  sd = {
      "f32": torch.randn(3, 4, generator=g),
      "f64": torch.randn(2, 3, generator=g, dtype=torch.float64),
      "f16": torch.randn(5, generator=g).half(),
      "bf16": torch.randn(4, 3, generator=g).bfloat16(),
      "i64": torch.tensor([-(2 ** 40), 0, 7]),
      "i32": torch.tensor([[1, -2], [3, -4]], dtype=torch.int32),
      "i16": torch.tensor([-300, 300], dtype=torch.int16),
      "i8": torch.tensor([-128, 127], dtype=torch.int8),
      "u8": torch.tensor([0, 255], dtype=torch.uint8),
      "bool": torch.tensor([True, False, True]),
      "c64": torch.tensor([1 + 2j, -3j], dtype=torch.complex64),
      "scalar": torch.tensor(3.5),
      "empty": torch.zeros(0, 3),
      # Views: transposed (non-contiguous), offset slice, strided slice, stride-0 expand,
      # and two views sharing one storage.
      "transposed": base.t(),
      "offset": big[3:9],
      "strided": big[1::3],
      "expanded": torch.tensor([1.0, 2.0]).expand(3, 2),
      "sub_block": base[1:4, 2:5],
      "param": torch.nn.Parameter(torch.randn(2, 2, generator=g)),
      "nested": {"inner": {"x": torch.ones(2, dtype=torch.float16)}},
  }
  path = tmp_path / "sd.bin"
  torch.save(sd, path)
  got = torch_archive.load_tensors(path)

  flat = {k: v for k, v in sd.items() if k != "nested"}
  flat["nested.inner.x"] = sd["nested"]["inner"]["x"]
  assert set(got) == set(flat)
  for name, t in flat.items():
    arr = got[name]
    assert arr.shape == tuple(t.shape), name
    assert arr.flags.c_contiguous, name
    if t.dtype == torch.bfloat16:
      assert arr.dtype.name == "bfloat16", name
      np.testing.assert_array_equal(arr.astype(np.float32), _as_numpy(t), err_msg=name)
    else:
      assert arr.dtype == _as_numpy(t).dtype, name
      np.testing.assert_array_equal(arr, _as_numpy(t), err_msg=name)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit.* deprecation notices
def test_module_state_dict_and_torchscript_names(tmp_path):
  torch = pytest.importorskip("torch", reason="CPU torch needed to write archives")
  torch.manual_seed(0)
  net = torch.nn.Sequential(
      torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4),
      torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Conv2d(4, 2, 1, bias=False)))
  net.eval()
  reference = {k: v.detach().numpy() for k, v in net.state_dict().items()}

  plain = tmp_path / "model.pth"
  torch.save(net.state_dict(), plain)
  got = torch_archive.load_tensors(plain)
  assert set(got) == set(reference)
  for k in reference:
    np.testing.assert_array_equal(got[k], reference[k])

  scripted = tmp_path / "model_script.pt"
  torch.jit.save(torch.jit.script(net), scripted)
  got = torch_archive.load_tensors(scripted)
  assert set(got) == set(reference)  # parameter + buffer names recovered from the module tree
  for k in reference:
    np.testing.assert_array_equal(got[k], reference[k])


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.needs_fid_weights
def test_fid_weights_archive():
  path, _ = fid_weights_path()
  tensors = torch_archive.load_tensors(path)
  assert len(tensors) == 376
  assert all(k.startswith("net.layers.") for k in tensors)
  assert tensors["net.layers.conv.weight"].shape == (32, 3, 3, 3)
  assert tensors["net.layers.mixed_10.tower_2_conv.weight"].shape == (192, 2048, 1, 1)
  # Non-tensor attributes are kept in the object tree (used to check the Flax graph).
  root = torch_archive.load_object(path)
  conv = root.attributes["net"].attributes["layers"].attributes["mixed_4"]
  conv = conv.attributes["tower"].attributes["conv_1"]
  assert conv.attributes["padding"] == [0, 3] and conv.attributes["stride"] == 1

  torch = pytest.importorskip("torch", reason="CPU torch needed for the state_dict comparison")
  reference = torch.jit.load(path, map_location="cpu").state_dict()
  assert set(reference) == set(tensors)
  for k, v in reference.items():
    np.testing.assert_array_equal(tensors[k], v.numpy(), err_msg=k)
