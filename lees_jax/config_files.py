"""What the config files under configs/ share: loading one config file from another, and the
preset check. Config files are loaded by path (ml_collections' ``config_flags``) and configs/ is
not an installed package, so a config built on another (every backbone's on configs/cifar10.py,
which documents each field) loads that file by its path through here."""

from __future__ import annotations

import importlib.util
import os

import ml_collections


def sibling_config(anchor: str, file_name: str, preset: str) -> ml_collections.ConfigDict:
  """``get_config(preset)`` of config file ``file_name`` in the folder of file ``anchor``."""
  path = os.path.join(os.path.dirname(os.path.abspath(anchor)), file_name)
  spec = importlib.util.spec_from_file_location(f'_lees_config_{file_name[:-3]}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(preset)


def check_preset(preset: str, presets: tuple[str, ...], anchor: str) -> str:
  """``preset`` ('' = the first of ``presets``), or a clear error naming the file's presets."""
  preset = preset or presets[0]
  if preset not in presets:
    raise ValueError(f'unknown preset {preset!r} for configs/{os.path.basename(anchor)}; choose '
                     f'one of {presets}')
  return preset
