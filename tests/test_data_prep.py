"""TFDS preparation as a user with (or without) a network meets it.

The network is blocked at the socket (name resolution and connect), so these tests walk the real
TFDS code -- builder construction, checksum and code-path lookup, the download manager -- up to
the first network call, and fail on any import error on the way.
"""

import os
import socket
import subprocess
import sys
import textwrap

import pytest

from conftest import REPO
from lees_jax import data_prep


@pytest.fixture
def no_network(monkeypatch):
  """Blocks DNS and connect; returns the hosts TFDS tried to reach. TFDS's 10 retries with
  back-off (minutes when offline) are cut to none."""
  from tensorflow_datasets.core.download import downloader
  hosts = []

  def getaddrinfo(host, *args, **kwargs):
    hosts.append(host)
    raise socket.gaierror(socket.EAI_NONAME, 'Name or service not known (blocked by test)')

  def connect(self, address):
    hosts.append(address)
    raise OSError(101, 'Network is unreachable (blocked by test)')

  monkeypatch.setattr(socket, 'getaddrinfo', getaddrinfo)
  monkeypatch.setattr(socket.socket, 'connect', connect)
  monkeypatch.setattr(downloader, 'MAX_RETRIES', 0)
  return hosts


@pytest.mark.parametrize('name, host', [
    ('cifar10', 'www.cs.toronto.edu'),
    ('cifar10_corrupted/gaussian_noise_3', 'zenodo.org'),
    ('celeb_a', 'drive.google.com'),
])
def test_tfds_preparation_reaches_the_download(no_network, tmp_path, name, host):
  """TFDS itself (not our wrapper): every import on its preparation path is installed."""
  import requests
  import tensorflow_datasets as tfds
  builder = tfds.builder(name, data_dir=str(tmp_path))
  assert not builder.is_prepared()
  with pytest.raises(requests.exceptions.ConnectionError):
    builder.download_and_prepare()
  assert host in no_network  # the download manager got as far as the network


def test_no_network_is_one_line_naming_dataset_url_and_remedies(no_network, tmp_path):
  with pytest.raises(data_prep.DataError) as e:
    data_prep.prepare('cifar10', str(tmp_path))
  msg = str(e.value)
  assert '\n' not in msg
  assert 'cannot download cifar10: no network' in msg
  assert 'https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz' in msg
  assert '--config.data.data_dir=DIR' in msg and 'python -m lees_jax.data_prep' in msg
  assert '--config.data.dataset=cifar10_subset' in msg
  # Failed at once, before TFDS's retries: one attempt at the host. (Other hosts may appear:
  # an earlier test's download threads, e.g. celeb_a's parallel Drive files, can still be
  # resolving while this one runs, and they meet this test's patched socket.)
  assert no_network.count('www.cs.toronto.edu') == 1


def test_unreachable_host_after_resolution_is_reported_too(no_network, monkeypatch, tmp_path):
  """DNS works, connections fail (a firewall): the error comes from inside TFDS's download."""
  monkeypatch.setattr(socket, 'getaddrinfo', lambda host, port, *a, **k: [
      (socket.AF_INET, socket.SOCK_STREAM, 6, '', ('127.0.0.1', port or 443))])
  with pytest.raises(data_prep.DataError) as e:
    data_prep.prepare('cifar10_corrupted/fog_3', str(tmp_path))
  msg = str(e.value)
  assert 'cannot download cifar10_corrupted/fog_3: no network (ConnectionError' in msg
  assert 'zenodo.org/record/2535967/files/CIFAR-10-C.tar' in msg
  assert 'cifar10_subset' not in msg  # no offline stand-in for CIFAR-10-C
  assert ('127.0.0.1', 443) in no_network


@pytest.mark.parametrize('name, files', [
    ('imagenet2012', ['ILSVRC2012_img_train.tar', 'ILSVRC2012_img_val.tar']),
    ('celeb_a_hq/64', ['data64x64.tar']),
])
def test_manual_download_names_files_and_place(no_network, tmp_path, name, files):
  with pytest.raises(data_prep.DataError) as e:
    data_prep.prepare(name, str(tmp_path))
  msg = str(e.value)
  manual = os.path.join(str(tmp_path), 'downloads', 'manual')
  assert f'{name} needs a manual download: put {", ".join(files)} into {manual}' in msg
  assert not no_network  # nothing was downloaded
  # With one of two files in place, only the other is asked for.
  if len(files) > 1:
    os.makedirs(manual)
    open(os.path.join(manual, files[0]), 'wb').close()
    with pytest.raises(data_prep.DataError, match=f'put {files[1]} into'):
      data_prep.prepare(name, str(tmp_path))


def test_unknown_dataset(tmp_path):
  with pytest.raises(data_prep.DataError, match="unknown TFDS data set 'cifar11'"):
    data_prep.prepare('cifar11', str(tmp_path))


# --- prepared copies: complete, partial, corrupt ------------------------------------------------


@pytest.fixture(scope='module')
def prepared(tmp_path_factory):
  """A real prepared TFDS data set (TFDS's own small test builder, prepared offline)."""
  from tensorflow_datasets import testing
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  builder = testing.DummyDataset(data_dir=data_dir)
  builder.download_and_prepare()
  return builder.name, data_dir, builder.info.splits['train'].num_examples


def _copy(src, dst):
  import shutil
  shutil.copytree(src, dst)
  return str(dst)


def test_prepared_copy_is_used_offline(prepared, no_network):
  name, data_dir, n = prepared
  b = data_prep.prepare(name, data_dir, download=False)
  assert b.info.splits['train'].num_examples == n > 0
  assert len(list(b.as_dataset(split='train').as_numpy_iterator())) == n  # TFDS's read path
  assert not no_network


def test_partial_copy_is_reported_and_kept(prepared, tmp_path):
  name, src, _ = prepared
  data_dir = _copy(src, tmp_path / 'tfds')
  shard = next(p for p in (tmp_path / 'tfds').rglob('*.tfrecord*'))
  shard.unlink()
  with pytest.raises(data_prep.DataError) as e:
    data_prep.prepare(name, data_dir)
  msg = str(e.value)
  assert 'is incomplete: 1 data file(s) missing' in msg and str(shard) in msg
  assert 'move that folder away and prepare again' in msg
  assert (tmp_path / 'tfds' / name / '1.0.0' / 'dataset_info.json').exists()  # nothing deleted


def test_corrupt_copy_is_reported_and_kept(prepared, tmp_path):
  name, src, _ = prepared
  data_dir = _copy(src, tmp_path / 'tfds')
  info = tmp_path / 'tfds' / name / '1.0.0' / 'dataset_info.json'
  info.write_text('{"name": "lees_test_ima')  # truncated
  with pytest.raises(data_prep.DataError) as e:
    data_prep.prepare(name, data_dir)
  msg = str(e.value)
  assert f'cannot read the prepared copy of {name}' in msg and 'is corrupt' in msg
  assert '\n' not in msg
  assert info.read_text() == '{"name": "lees_test_ima'


def test_not_prepared_without_download(tmp_path):
  with pytest.raises(data_prep.DataError, match='cifar10 is not prepared in .*data_prep'):
    data_prep.prepare('cifar10', str(tmp_path), download=False)


# --- what a config reads; the command ------------------------------------------------------------


def test_config_datasets_of_the_paper_preset():
  from configs import cifar10
  config = cifar10.get_config('paper')
  names = data_prep.config_datasets(config)
  ex = config.experiment
  assert names[0] == 'cifar10'
  assert names[1:] == [f'cifar10_corrupted/{c}_3' for c in ex.corruptions]
  assert len(names) == 15


def test_data_prep_command_offline(no_network, tmp_path, capsys):
  assert data_prep.main(['--data_dir', str(tmp_path), 'cifar10']) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith('error: cannot download cifar10: no network')


def test_data_prep_command_reads_the_config(no_network, tmp_path, capsys):
  config = os.path.join(REPO, 'configs', 'cifar10.py')
  assert data_prep.main(['--data_dir', str(tmp_path), '--config', f'{config}:tiny']) == 0
  assert 'reads no TFDS data set' in capsys.readouterr().out
  assert data_prep.main(['--data_dir', str(tmp_path), '--config', config]) == 2
  assert capsys.readouterr().err.startswith('error: cannot download cifar10: no network')


_BLOCKED_MAIN = textwrap.dedent('''
    import socket, sys
    def blocked(*a, **k):
      raise socket.gaierror(socket.EAI_NONAME, 'Name or service not known (blocked by test)')
    socket.getaddrinfo = blocked
    sys.argv = ['lees_jax.main'] + sys.argv[1:]
    from absl import app
    from lees_jax import main
    app.run(main.main)
''')


def test_main_offline_prints_one_line_and_keeps_the_workdir(tmp_path):
  """The issue's command: the paper preset's data set, offline, from the command line."""
  workdir = tmp_path / 'W'
  (workdir / 'checkpoints').mkdir(parents=True)
  (workdir / 'checkpoints' / 'earlier.txt').write_text('an earlier run')
  cmd = [sys.executable, '-c', _BLOCKED_MAIN, '--config=configs/cifar10.py:tiny',
         '--config.mode=pretrain', '--config.data.dataset=cifar10',
         f'--config.data.data_dir={tmp_path / "tfds"}', f'--workdir={workdir}']
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert r.returncode == 1, r.stderr[-3000:]
  assert 'Traceback' not in r.stderr, r.stderr[-3000:]
  last = r.stderr.strip().splitlines()[-1]
  assert last.startswith('error: cannot download cifar10: no network'), r.stderr[-3000:]
  assert (workdir / 'checkpoints' / 'earlier.txt').read_text() == 'an earlier run'


def test_celeb_a_without_network_names_google_drive_and_the_folder_route(no_network, tmp_path):
  """TFDS celeb_a downloads from Google Drive: offline, the one-line error names it and the
  extracted-folder alternative (Drive's quota often refuses CelebA)."""
  with pytest.raises(data_prep.DataError) as e:
    data_prep.prepare('celeb_a', str(tmp_path))
  msg = str(e.value)
  assert 'cannot download celeb_a: no network' in msg and 'drive.google.com' in msg
  assert '--config.data.dataset=image_folder' in msg and "train[:162770]" in msg
  assert '\n' not in msg
