"""ΔFID: how well a policy denoises corrupted inputs, against the full model on clean ones.

A policy's robustness is measured on its own outputs (SDEdit-style): CIFAR-10-C inputs c(x) and
their clean originals x are noised to a middle sampler step i0 and denoised by the policy's
sampler from there (`samplers.compile_sampler(..., start_step=i0)`); the FID of what comes out
against the clean images says how well the policy recovers clean data from corrupted data.
The anchor every policy is compared with is the full model on the clean inputs, so that a
policy cannot look robust by being bad on clean inputs too (`DEFINITION`, with the run's values
in every result; the study's definition, see `lees_jax.experiment`).

The Fréchet distances use the 'svd' method: each covariance is decomposed once
(`fid.Statistics.sqrt_eigh`), the clean reference once per run.
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from lees_jax import data, files, policies, processes, samplers

DEFAULT_T_START = 0.5  # config.experiment.robustness_t_start when the config has no such field

# One paragraph for the README and every report (which heads it "ΔFID definition (ours; the
# paper gives none)"), formatted with a run's values by `definition`.
DEFINITION = (
    'ΔFID measures how well a policy\'s own sampler recovers clean images from corrupted '
    'ones, against the full model on clean ones. Inputs: the first '
    '{num_images} images c(x) of `{corrupted}` (CIFAR-10-C is built from the CIFAR-10 test set '
    'in order, so its image i is a corrupted copy of clean test image i) and the same '
    '{num_images} clean images x of `{clean}`. Each input is noised to sampler step '
    'i0 = {start_step} of the sampler ({sampler}), the first step whose timestep is <= '
    't_start·T = {t_start:g}·{num_timesteps} (τ = {timestep}): {noising}, with one fixed ε per '
    'image (drawn from the cell\'s seed) shared by every '
    'policy, every corruption and the clean copy, so comparisons are paired; the policy π\'s '
    'own sampler then denoises it from step i0 to the end ({steps_run} of its {num_steps} steps), '
    'giving D_π. '
    'FID_c(π) = FID(D_π(c(x)), clean), *clean* being the FID statistics of the {num_images} '
    'clean images; R(π) = the mean of FID_c(π) over the {num_corruptions} corruptions (the '
    'corrupted-input FID). The anchor A = FID(D_full(x), clean) is the full model denoising the '
    'clean inputs with the same noise, one number per seed common to every policy. '
    'ΔFID_c(π) = FID_c(π) − A and ΔFID(π) = R(π) − A: lower is more robust, and because A is '
    'common to all policies ΔFID orders them exactly as R does (a degraded policy cannot look '
    'more robust through a worse clean baseline). Each record also carries the policy\'s own '
    'clean-input FID, FID(D_π(x), clean). Fréchet distances by the \'svd\' method.')


def definition(**values) -> str:
  """`DEFINITION` with a run's values (the keys of ``Robustness.definition_values``)."""
  return DEFINITION.format(**values)


def _split(ex) -> str:
  n = int(ex.robustness_reference_size)
  return f'{ex.robustness_split}[:{n}]' if n > 0 else ex.robustness_split


def corrupted_name(ex, corruption: str) -> str:
  """The TFDS name of one corruption at the configured severity, e.g. 'cifar10_corrupted/fog_3'."""
  return f'{ex.robustness_dataset}/{corruption}_{int(ex.severity)}'


def load_inputs(config) -> dict:
  """The inputs of ``config.experiment``: {'clean': uint8 (N, H, W, C), 'corrupted': {c: uint8}}
  (the first ``robustness_reference_size`` images of ``robustness_split``, dataset order)."""
  ex = config.experiment
  split = _split(ex)
  if config.data.dataset != 'cifar10':
    # CIFAR-10-C image i corrupts CIFAR-10 test image i; other clean images break the pairing.
    print(f'robustness: clean inputs from {config.data.dataset!r}, not CIFAR-10: they are not the '
          f'source images of {ex.robustness_dataset}, so inputs are not paired', flush=True)
  return {'clean': data.split_images(config.data, split),
          'corrupted': {c: data.tfds_images(corrupted_name(ex, c), split, config.data.data_dir)
                        for c in ex.corruptions}}


def _check_inputs(images: dict, n: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """(clean, corrupted), cut to the first ``n`` images (n <= 0: all), all of one shape."""
  cut = (lambda a: a[:n]) if n > 0 else (lambda a: a)
  clean = np.asarray(cut(images['clean']))
  corrupted = {c: np.asarray(cut(a)) for c, a in images['corrupted'].items()}
  if clean.dtype != np.uint8 or clean.ndim != 4 or clean.shape[0] < 2:
    raise ValueError(f'clean inputs must be uint8 (N >= 2, H, W, C), got {clean.dtype} {clean.shape}')
  if not corrupted:
    raise ValueError('no corrupted inputs (experiment.corruptions is empty)')
  for c, a in corrupted.items():
    if a.shape != clean.shape or a.dtype != np.uint8:
      raise ValueError(f'corruption {c!r}: {a.dtype} {a.shape} images, but the clean inputs are '
                       f'uint8 {clean.shape}: each needs a corrupted copy of every clean image')
  return clean, corrupted


class Robustness:
  """ΔFID of policies: inputs and the clean reference loaded once, then `evaluate` per cell.

  ``evaluator``: an `evaluate.Evaluator`, or anything with its ``model``, ``params``,
  ``solver``, ``mesh``, ``extractor`` and ``fid`` (the `lees_jax.fid` module).
  ``images``: {'clean': uint8 (N, H, W, C), 'corrupted': {name: uint8 of the same shape}}
  instead of the config's datasets (tests, offline runs; image i of each corruption must be
  a corrupted copy of clean image i). The clean reference statistics are cached in
  ``out_dir`` (through `lees_jax.files`; reused only for the same image bytes and weights).
  """

  def __init__(self, config, evaluator, out_dir: str, images: dict | None = None):
    if jax.process_count() > 1:
      # Its inputs are host arrays fed to the sampler; sharding them across hosts is not built.
      raise ValueError(f'the robustness measure runs in one process ({jax.process_count()} '
                       'were started): set config.experiment.robustness=False for a multi-host '
                       'study, or run the study on one host (all of its devices)')
    ex = config.experiment
    self.evaluator = evaluator
    self.fid = evaluator.fid
    self.solver = evaluator.solver
    # How an input is noised to the start step: the backbone's diffusion process (DDPM's
    # q(x_τ | x), or the VP SDE's marginal at a continuous t).
    self.process = processes.from_config(config.diffusion)
    self.t_start = float(ex.get('robustness_t_start', DEFAULT_T_START))
    self.start_step = samplers.start_step(self.solver, self.t_start)
    if evaluator.model.input.kind != 'pixels':
      raise ValueError('the robustness measure noises and denoises images; a latent backbone '
                       f'({type(evaluator.model).__name__}) would need them encoded: set '
                       'config.experiment.robustness=False')
    injected = images is not None
    self.clean, self.corrupted = _check_inputs(images if injected else load_inputs(config),
                                               int(ex.robustness_reference_size))
    n = self.clean.shape[0]
    split = _split(ex)
    clean_name = 'injected clean images' if injected else f'{config.data.dataset} {split}'
    files.makedirs(out_dir)
    tag = 'injected' if injected else f'{config.data.dataset}_{split}'
    cache = files.join(out_dir, f'ref_clean_{tag.replace("[", "_").replace(":", "_").strip("]")}.npz')
    self.reference = self.fid.load_or_compute_reference_stats(self.clean, cache,
                                                              extractor=evaluator.extractor)
    ndev = evaluator.mesh.devices.size if evaluator.mesh is not None else 1
    self.batch_size = min(int(config.sampler.batch_size), -(-n // ndev) * ndev)
    self.path = config.sampler.path
    self._programs: dict = {}
    self._anchors: dict[int, tuple] = {}  # seed -> (statistics, FID) of D_full(clean inputs)
    corrupted = ('injected corrupted images' if injected else
                 f'{ex.robustness_dataset}/<c>_{int(ex.severity)} {split}')
    self.definition_values = dict(
        num_images=n, corrupted=corrupted, severity=int(ex.severity), clean=clean_name,
        start_step=self.start_step, sampler=self.solver.describe(), t_start=self.t_start,
        num_timesteps=self.solver.num_original_timesteps,
        timestep=self.solver.timestep_values()[self.start_step], noising=self.process.noising,
        steps_run=self.solver.num_steps - self.start_step, num_steps=self.solver.num_steps,
        num_corruptions=len(self.corrupted))
    self.definition = definition(**self.definition_values)
    self.description = (f'inputs: {corrupted} ({", ".join(self.corrupted)}) and {clean_name}; '
                        f'reference: {clean_name} ({n} images)')

  # -- programs and denoising -------------------------------------------------

  def program(self, policy: policies.Policy, cache_key=None) -> samplers.PartialSampleProgram:
    """The policy's sampler from step i0 (cached under ``cache_key``; the full policy always)."""
    if isinstance(policy, policies.FullPolicy):
      cache_key = ('full',)  # every full policy has the same masks
    if cache_key is not None and cache_key in self._programs:
      return self._programs[cache_key]
    ev = self.evaluator
    prog = samplers.compile_sampler(ev.model, self.solver, policy, self.batch_size,
                                    path='soft' if policy.soft else self.path, mesh=ev.mesh,
                                    start_step=self.start_step)
    if cache_key is not None:
      self._programs[cache_key] = prog
    return prog

  def denoise(self, program, params, images: np.ndarray, seed: int):
    """Yields D_π of ``images`` in batches (uint8). Batch b noises with ε from
    fold_in(k_noise, b) and samples with fold_in(k_steps, b), (k_noise, k_steps) =
    split(PRNGKey(seed)): the same ε for image i of every input set and every policy."""
    noise_key, step_key = jax.random.split(jax.random.PRNGKey(int(seed)))
    bs = program.batch_size
    shape = (bs,) + images.shape[1:]
    params = program.prepare_params(params)  # the 'stacked' path's layout, made once
    for b, start in enumerate(range(0, images.shape[0], bs)):
      chunk = images[start:start + bs]
      x0 = np.zeros(shape, np.float32)  # a short last batch is padded; its extra rows dropped
      x0[:chunk.shape[0]] = data.to_model_range(chunk)
      eps = jax.random.normal(jax.random.fold_in(noise_key, b), shape, jnp.float32)
      x = self.process.noise_to_step(self.solver, x0, self.start_step, eps)
      yield data.to_uint8(program(params, jax.random.fold_in(step_key, b), x))[:chunk.shape[0]]

  def _stats(self, program, params, images, seed):
    return self.fid.compute_statistics(self.denoise(program, params, images, seed),
                                       extractor=self.evaluator.extractor)

  def _fid(self, stats) -> float:
    return self.fid.fid_from_statistics(stats, self.reference, method='svd')

  def anchor(self, seed: int) -> tuple:
    """(statistics, FID) of the full model denoising the clean inputs (once per seed)."""
    seed = int(seed)
    if seed not in self._anchors:
      stats = self._stats(self.program(policies.FullPolicy()), self.evaluator.params, self.clean, seed)
      self._anchors[seed] = (stats, self._fid(stats))
    return self._anchors[seed]

  # -- one policy -------------------------------------------------------------

  def evaluate(self, policy, params=None, seed: int = 0, *, cache_key=None,
               clean_input: bool = True) -> dict:
    """ΔFID of ``policy`` (a `policies.Policy` or an `evaluate.ResolvedPolicy`, whose params
    replace the backbone's) with its inputs' noise from ``seed``; see `DEFINITION`.

    ``clean_input=False`` skips the policy's own clean-input FID (informative only, one more
    pass over the clean inputs; ``fid_clean_input`` is then None unless it is the anchor).
    """
    if not isinstance(policy, policies.Policy):  # a ResolvedPolicy
      params = policy.params if params is None else params
      policy = policy.policy
    backbone = self.evaluator.params
    params = backbone if params is None else params
    t0 = time.perf_counter()
    program = self.program(policy, cache_key)
    _, anchor = self.anchor(seed)
    if isinstance(policy, policies.FullPolicy) and params is backbone:
      clean_input = anchor  # the same program on the same inputs and noise
    elif clean_input:
      clean_input = self._fid(self._stats(program, params, self.clean, seed))
    else:
      clean_input = None
    fid_c = {c: self._fid(self._stats(program, params, imgs, seed))
             for c, imgs in self.corrupted.items()}
    r = statistics.fmean(fid_c.values())
    own = '' if clean_input is None else f', clean-input FID {clean_input:.3f}'
    print(f'  robustness: ΔFID {r - anchor:+.3f} (corrupted-input FID {r:.3f}, anchor {anchor:.3f}'
          f'{own}; {time.perf_counter() - t0:.1f}s)', flush=True)
    return {'delta_fid': r - anchor, 'per_corruption': {c: v - anchor for c, v in fid_c.items()},
            'fid_corrupted': fid_c, 'corrupted_input_fid': r, 'fid_clean_input': clean_input,
            'anchor_fid': anchor, 'num_images': int(self.clean.shape[0]), 't_start': self.t_start,
            'start_step': self.start_step, 'start_timestep': self.definition_values['timestep'],
            'steps_run': self.definition_values['steps_run'], 'seed': int(seed),
            'block_ratio': program.block_ratio, 'flop_fraction': program.flop_fraction,
            'fid_method': 'svd', 'definition': self.definition, 'references': self.description}
