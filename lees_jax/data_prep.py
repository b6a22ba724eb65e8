"""Preparing TFDS data sets, with failures a user can act on.

Every TFDS data set a run reads goes through `prepare` first: it builds the TFDS builder, checks
a prepared copy for completeness, checks manual downloads (ImageNet, CelebA-HQ) before TFDS
starts, and downloads and prepares the rest. What can go wrong with data raises `DataError`,
whose message is one line of cause and remedy; `main` prints it without a traceback. Nothing
here writes outside ``data_dir`` (TFDS's own download and preparation folders), and nothing
is deleted: a broken copy is reported, never removed.

Also a command for preparing data on a machine with a network, to carry it to one without::

  python -m lees_jax.data_prep --data_dir=D cifar10 cifar10_corrupted/gaussian_noise_3
  python -m lees_jax.data_prep --data_dir=D --config=configs/cifar10.py   # all a config reads
"""

from __future__ import annotations

import os
import re
import socket
import sys
import urllib.error
import urllib.parse

# Files a data set needs by hand, placed in ``<data_dir>/downloads/manual/``, and where to get
# them. ``{res}`` is the config's resolution (CelebA-HQ has one archive per resolution).
MANUAL_DOWNLOADS = {
    'imagenet2012': (('ILSVRC2012_img_train.tar', 'ILSVRC2012_img_val.tar'),
                     'https://image-net.org/download-images (registration required)'),
    'celeb_a_hq': (('data{res}x{res}.tar',),
                   'the progressive_growing_of_gans dataset tool writes them from CelebA and the '
                   'CelebA-HQ deltas, https://github.com/tkarras/progressive_growing_of_gans; '
                   'or use a folder of CelebA-HQ images as they circulate, '
                   '--config.data.dataset=image_folder --config.data.folder=DIR '
                   "--config.data.crop=box"),
}
# Published sizes (TFDS catalog), for the messages and the README.
SIZES = {
    'cifar10': 'download 162 MiB, prepared 132 MiB',
    'cifar10_corrupted': 'download 2.72 GiB (one archive for every corruption), 22 MiB per '
                         'prepared corruption/severity',
    'celeb_a': 'download 1.38 GiB from Google Drive, prepared 1.69 GiB',
}
_OFFLINE_HINT = {
    'cifar10': ', or the offline subset: --config.data.dataset=cifar10_subset',
    # Google Drive often refuses CelebA for a day ("quota exceeded"): the extracted
    # img_align_celeba/ (sorted names; its first 162,770 files are the train split) works too.
    'celeb_a': (', or an extracted img_align_celeba/ folder: --config.data.dataset=image_folder '
                "--config.data.folder=DIR --config.data.train_split='train[:162770]'"),
}


class DataError(RuntimeError):
  """A data set cannot be used as configured. ``str(e)`` is one line: cause and remedy."""


def _tfds():
  from lees_jax import data  # pylint: disable=g-import-not-at-top
  data.configure_tensorflow()  # TF must not grab the accelerators
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return tfds


def _data_dir_text(data_dir) -> str:
  return data_dir or '~/tensorflow_datasets (the TFDS default)'


def builder(name: str, data_dir: str | None = None):
  """The TFDS builder of ``name`` ('cifar10', 'cifar10_corrupted/fog_3', ...)."""
  tfds = _tfds()
  try:
    return tfds.builder(name, data_dir=data_dir or None)
  except tfds.core.registered.DatasetNotFoundError:
    raise DataError(f'unknown TFDS data set {name!r}: check the name (and config, e.g. '
                    'cifar10_corrupted/fog_3) against the TFDS catalog') from None
  except Exception as e:  # pylint: disable=broad-except
    raise DataError(f'cannot read the prepared copy of {name} in {_data_dir_text(data_dir)} '
                    f'({type(e).__name__}: {_first_line(e)}): the folder is corrupt; move it '
                    'away and prepare again, or point --config.data.data_dir at a good copy') from None


def _first_line(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  return text[0][:300] if text else ''


def _missing_files(b) -> list[str]:
  """Files a prepared copy's metadata lists that are not on disk."""
  missing = []
  for split in b.info.splits.values():
    for path in split.filepaths:
      if not path.exists():
        missing.append(os.fspath(path))
  return missing


def _check_complete(b, name: str):
  try:
    missing = _missing_files(b)
  except Exception as e:  # pylint: disable=broad-except
    raise DataError(f'the prepared copy of {name} in {b.data_dir} is unreadable '
                    f'({type(e).__name__}: {_first_line(e)}): move that folder away and prepare '
                    'again, or point --config.data.data_dir at a good copy') from None
  if missing:
    raise DataError(f'the prepared copy of {name} in {b.data_dir} is incomplete: '
                    f'{len(missing)} data file(s) missing, e.g. {missing[0]}; move that folder '
                    'away and prepare again (python -m lees_jax.data_prep), or point '
                    '--config.data.data_dir at a complete copy')


def _manual_files(b, family: str) -> list[str]:
  names, _ = MANUAL_DOWNLOADS[family]
  res = getattr(b.builder_config, 'resolution', None)
  return [n.format(res=res) for n in names]


def _check_manual(b, name: str, data_dir):
  family = name.split('/')[0]
  if family not in MANUAL_DOWNLOADS:
    return
  manual_dir = os.path.join(os.path.expanduser(data_dir or os.path.join('~', 'tensorflow_datasets')),
                            'downloads', 'manual')
  files = _manual_files(b, family)
  missing = [f for f in files if not os.path.exists(os.path.join(manual_dir, f))]
  if missing:
    raise DataError(f'{name} needs a manual download: put {", ".join(missing)} into {manual_dir} '
                    f'(source: {MANUAL_DOWNLOADS[family][1]}), then run again; TFDS prepares it '
                    'from there')


def _no_network(name: str, cause: str, url: str) -> DataError:
  return DataError(
      f'cannot download {name}: no network ({cause} for the data set archive {url}). Prepare it '
      f'where there is a network (python -m lees_jax.data_prep --data_dir=DIR {name}) and pass '
      f'--config.data.data_dir=DIR (a local path or gs://){_OFFLINE_HINT.get(name.split("/")[0], "")}')


def _check_hosts_resolve(b, name: str):
  """Fails at once when a download host has no address (no network): TFDS would otherwise
  retry each URL with back-off for minutes before giving up."""
  for url in (b.url_infos or {}):
    host = urllib.parse.urlsplit(url).hostname
    if not host:
      continue
    try:
      socket.getaddrinfo(host, None)
    except OSError as e:
      raise _no_network(name, f'cannot resolve {host}: {e}', url) from None


def _is_network_error(e: BaseException) -> bool:
  import requests  # pylint: disable=g-import-not-at-top
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, (requests.exceptions.ConnectionError, requests.exceptions.Timeout,
                      socket.gaierror, socket.timeout, urllib.error.URLError, ConnectionError)):
      return True
    e = e.__cause__ or e.__context__
  return False


def _url_of(e: BaseException) -> str:
  m = re.search(r"host='([^']+)'.*?url: (\S+?)(?: |\()", str(e))
  if m:
    return f'https://{m.group(1)}{m.group(2)}'
  m = re.search(r'(https?://\S+)', str(e))
  return m.group(1).rstrip(').,"\'') if m else 'its download URL'


def prepare(name: str, data_dir: str | None = None, *, download: bool = True):
  """Makes ``name`` ready to read from ``data_dir``; returns its TFDS builder.

  A prepared copy is checked for missing files. Otherwise manual downloads are checked, then
  TFDS downloads (into ``<data_dir>/downloads``, reused by later runs; an interrupted download
  starts that file again) and prepares. ``download=False`` reports a missing copy instead.
  """
  b = builder(name, data_dir)
  if b.is_prepared():
    _check_complete(b, name)
    return b
  if not download:
    raise DataError(f'{name} is not prepared in {_data_dir_text(data_dir)}: prepare it with '
                    f'python -m lees_jax.data_prep --data_dir=DIR {name} and pass '
                    '--config.data.data_dir=DIR')
  _check_manual(b, name, data_dir)
  _check_hosts_resolve(b, name)
  size = SIZES.get(name.split('/')[0])
  print(f'Preparing TFDS {name} in {_data_dir_text(data_dir)}' + (f' ({size})' if size else '') +
        ': downloads once, later runs reuse it', flush=True)
  try:
    b.download_and_prepare()
  except Exception as e:  # pylint: disable=broad-except
    if not _is_network_error(e):
      raise
    raise _no_network(name, f'{type(e).__name__}: {_first_line(e)[:120]}', _url_of(e)) from None
  return b


def config_datasets(config) -> list[str]:
  """The TFDS data sets a config's run reads: its data set and, for the study's robustness
  measure, every corruption at the configured severity."""
  from lees_jax import data  # pylint: disable=g-import-not-at-top
  names = [] if config.data.dataset in data.IN_MEMORY else [data.tfds_name(config.data)]
  ex = config.get('experiment')
  if ex is not None and ex.get('robustness'):
    names += [f'{ex.robustness_dataset}/{c}_{int(ex.severity)}' for c in ex.corruptions]
  return names


def main(argv=None) -> int:
  import argparse  # pylint: disable=g-import-not-at-top
  p = argparse.ArgumentParser(prog='python -m lees_jax.data_prep', description=__doc__.split('\n')[0])
  p.add_argument('names', nargs='*', help='TFDS names, e.g. cifar10 cifar10_corrupted/fog_3')
  p.add_argument('--data_dir', default=None, help='TFDS data directory (local or gs://)')
  p.add_argument('--config', default=None,
                 help='also prepare every data set this config reads, e.g. configs/cifar10.py:paper')
  args = p.parse_args(argv)
  names = list(args.names)
  if args.config:
    from ml_collections.config_flags import config_flags  # pylint: disable=g-import-not-at-top
    names += config_datasets(config_flags.ConfigFileFlagParser('config').parse(args.config))
  if not names:
    if not args.config:
      p.error('name a data set or give --config')
    print(f'{args.config} reads no TFDS data set (only the shipped subset): nothing to prepare')
    return 0
  try:
    for i, name in enumerate(dict.fromkeys(names)):
      b = prepare(name, args.data_dir)
      print(f'[{i + 1}/{len(set(names))}] {name}: ready in {b.data_dir}', flush=True)
  except DataError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  return 0


if __name__ == '__main__':
  sys.exit(main())
