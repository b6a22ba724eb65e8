"""ΔFID: how much closer a policy's samples are to clean data than to corrupted data.

For each corruption c at one severity, ΔFID_c = FID(samples, C_c) − FID(samples, clean), with
C_c the first ``robustness_reference_size`` images of ``<robustness_dataset>/<c>_<severity>``
(split ``robustness_split``) and ``clean`` the same images of ``config.data`` uncorrupted;
ΔFID is the mean over the corruptions (``config.experiment``; the study's definition, see
`lees_jax.experiment`). The Fréchet distances use the 'svd' method: each covariance is
decomposed once (`fid.Statistics.sqrt_eigh`), so many references cost one small SVD each.
"""

from __future__ import annotations

import statistics

from lees_jax import files


class Robustness:
  """Cached reference statistics for ΔFID (clean split and each corruption at one severity)."""

  def __init__(self, config, evaluator, out_dir: str):
    from lees_jax import data  # pylint: disable=g-import-not-at-top
    ex = config.experiment
    fid = evaluator.fid
    n = int(ex.robustness_reference_size)
    split = f'{ex.robustness_split}[:{n}]' if n > 0 else ex.robustness_split
    files.makedirs(out_dir)

    def stats(tag, load):
      cache = files.join(out_dir, f'ref_{tag}_{split.replace("[", "_").replace(":", "_").strip("]")}.npz')
      if files.isfile(cache):  # named by dataset and split: skip reading the images again
        st, meta = fid.load_statistics(cache)
        if meta.get('weights_sha1') == evaluator.extractor.weights_sha1:
          return st
      return fid.load_or_compute_reference_stats(load(), cache, extractor=evaluator.extractor)

    self.clean = stats(f'clean_{config.data.dataset}', lambda: data.split_images(config.data, split))
    self.corrupted = {}
    for c in ex.corruptions:
      name = f'{ex.robustness_dataset}/{c}_{int(ex.severity)}'
      self.corrupted[c] = stats(name.replace('/', '_'),
                                lambda name=name: data.tfds_images(name, split, config.data.data_dir))
    self.fid = fid
    self.num_samples = int(ex.robustness_num_samples)
    self.description = (f'{ex.robustness_dataset} <corruption>_{int(ex.severity)} {split} vs '
                        f'{config.data.dataset} {split}')

  def delta_fid(self, sample_stats, images, extractor) -> dict:
    """ΔFID of a cell's samples; 'svd' Fréchet distances, whose eigendecompositions the
    statistics cache (each reference decomposed once per run, the samples once per cell)."""
    if 0 < self.num_samples < len(images):
      sample_stats = self.fid.compute_statistics(images[:self.num_samples], extractor=extractor)
    fid = self.fid.fid_from_statistics
    clean = fid(sample_stats, self.clean, method='svd')
    per = {c: fid(sample_stats, s, method='svd') - clean for c, s in self.corrupted.items()}
    return {'fid_clean': clean, 'per_corruption': per,
            'delta_fid': statistics.fmean(per.values()) if per else None,
            'num_samples': int(sample_stats.count), 'references': self.description}
