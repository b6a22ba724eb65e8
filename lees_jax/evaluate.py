"""``config.mode=evaluate``: sample each policy, measure quality (FID) and speed.

For every policy in ``config.eval.policies`` and every seed in ``config.eval.seeds``:
generate ``num_samples`` images with the configured sampler, compute FID against the
reference split's statistics (cached), time a 100-image batch (median over repeats after
a warm-up, ``block_until_ready``), and record the executed-block ratio and FLOP fraction.

Across several processes (hosts), each batch is sampled sharded over every process's devices
and gathered to every process (`samplers.to_host`); each process then computes the same FID
from the same images, process 0 computes and caches the reference statistics that the others
read, and only process 0 writes (`lees_jax.files`). Latency is process 0's clock around a
whole sharded batch.

Policy specs (strings, so they fit a locked config and a command line; the one resolver of
policies, used by evaluate, the experiment's cells and the tests):
  full                      every unit at every step (B1)
  ase:<name>                an ASE schedule: ase_default (B2), D2, D3, D4, D7
  ase_grid:<grid.jsonl>[@b] the best grid schedule within FLOP budget b (default
                            config.eval.ase_budget; B3, see ase.py)
  ase_grid:<pareto.json>    the schedule picked in a grid's pareto.json (its "pick")
  lees:<gates workdir>      learned gates, hard (the workdir of a train_gates run)
  lees_soft:<gates workdir> the same gates used soft (units blended by g_k(t))
  random:<fraction>[:<seed>] random fixed gates executing about that block fraction (A3)
  ase_ft:<ase_finetune workdir> an ASE schedule with the backbone fine-tuned under it (the
                            paper's ASE; its fine-tuned EMA params replace the backbone)
  deepcache:<N>[:uniform|:nonuniform][@<branch>]
                            DeepCache (training-free): a full step every N steps (uniform,
                            the default, or DeepCache's non-uniform 1:N), in between only the
                            shallow branch of long skip <branch> (default 1) on the cached deep
                            feature (`lees_jax.reuse`; U-Nets: DDPM UNet, ADM)
  l2c:<dir or routers.json>[@<threshold>]
                            Learning-to-Cache routers of a train_l2c run: per sampler step,
                            blocks whose router is below the threshold reuse their last residual
  lees3:<dir or lees3_gates.json>
                            three-choice LEES (run / reuse residual / skip as functions of t) of
                            a train_lees3 run (`lees_jax.learned_reuse`)

Writes ``W/eval/results.json`` (a list of records; finished records are kept and skipped
on restart), CLU summaries in ``W/eval``, a sample grid PNG per policy and a heat-map
PNG of executed units per gated policy. Every file goes through `lees_jax.files` (atomic;
``W`` may be gs://).
"""

from __future__ import annotations

import copy
import dataclasses
import os
import re
import statistics
import time

import jax
import numpy as np

from lees_jax import (ase, checkpoints, data, files, learned_reuse, models, policies, reuse,
                      samplers)

RESULT_KEYS = ('policy', 'seed', 'sampler', 'steps', 'num_samples', 'fid', 'latency_ms_per_100',
               'images_per_s', 'block_ratio', 'flop_fraction')


@dataclasses.dataclass
class ResolvedPolicy:
  name: str
  policy: policies.Policy
  params: object = None  # a backbone replacing the default one (e.g. a fine-tuned one)


def _safe_name(spec: str) -> str:
  return re.sub(r'[^A-Za-z0-9_.-]+', '_', spec).strip('_')


def resolve_policy(spec: str, model, *, default_budget: float = 0.75,
                   name: str | None = None) -> ResolvedPolicy:
  """Turns a policy spec string into a policy (clear errors for bad specs).

  ``name`` replaces the spec's default name, the ``policy`` of result records (the experiment
  names its policies by cell).
  """
  if name is not None:
    return dataclasses.replace(resolve_policy(spec, model, default_budget=default_budget), name=name)
  kind, _, arg = spec.partition(':')
  units = model.units
  if kind == 'full':
    return ResolvedPolicy('full', policies.FullPolicy())
  if kind == 'ase':
    return ResolvedPolicy(arg or 'ase_default', ase.named_schedule(arg or 'ase_default', units))
  if kind == 'ase_grid':
    path, _, budget = arg.partition('@')
    if not files.isfile(path):
      raise FileNotFoundError(f'policy {spec!r}: no grid results at {path!r}; run the ASE grid search '
                              '(config.mode=ase_grid) first')
    if path.endswith('.jsonl'):
      best = ase.pick_for_budget(files.read_json_lines(path),
                                 float(budget) if budget else default_budget)
    else:  # a pareto.json: its recorded pick (the experiment's budget and fallback rules)
      best = files.read_json(path)['pick']
    point = ase.GridPoint(int(best['start']), float(best['final']))
    return ResolvedPolicy('ase_grid', ase.grid_policy(point, units))
  if kind in ('lees', 'lees_soft'):
    pol = policies.load_gates(arg)
    form = 'soft' if kind == 'lees_soft' else 'hard'
    name = f'{kind}_{os.path.basename(os.path.normpath(arg))}'
    return ResolvedPolicy(name, policies.LeesPolicy(pol.alpha, pol.beta, form=form, name=name))
  if kind == 'ase_ft':
    from lees_jax import objectives  # pylint: disable=g-import-not-at-top
    params, pol = objectives.load_ase_finetuned(arg, expected_model_config=model.spec)
    name = f'ase_ft_{os.path.basename(os.path.normpath(arg))}'
    return ResolvedPolicy(name, policies.SchedulePolicy(pol.matrix, name=name), params)
  if kind == 'random':
    frac, _, seed = arg.partition(':')
    try:
      frac_f = float(frac)
    except ValueError:
      raise ValueError(f'policy {spec!r}: expected random:<fraction>[:<seed>]') from None
    p = policies.random_gate_params(int(seed or 0), len(units), frac_f)
    return ResolvedPolicy(f'random_{frac_f:g}', policies.LeesPolicy(p['alpha'], p['beta'],
                                                                  name=f'random_{frac_f:g}'))
  if kind == 'deepcache':
    pol = reuse.parse_spec(arg, model)
    return ResolvedPolicy(pol.name, pol)
  if kind in learned_reuse.KINDS:
    pol = learned_reuse.parse_spec(kind, arg)
    return ResolvedPolicy(pol.name, pol)
  raise ValueError(f'unknown policy spec {spec!r}; expected full, ase:<name>, ase_grid:<file>[@budget], '
                   'lees:<dir>, lees_soft:<dir>, random:<fraction>[:<seed>], ase_ft:<dir> or '
                   'deepcache:<N>[:uniform|:nonuniform][@<branch>], l2c:<dir>[@<threshold>] or '
                   'lees3:<dir>')


def load_results(path: str) -> list[dict]:
  if not files.exists(path):
    return []
  try:
    return files.read_json(path)
  except ValueError as e:  # json.JSONDecodeError
    raise ValueError(f'{path} is not valid JSON ({e}); move it away to start the evaluation afresh') from e


def time_batch(program: samplers.SampleProgram, params, repeats: int) -> float:
  """Median wall time (ms) of one sampler call after a warm-up, synchronised on the result."""
  rng = jax.random.PRNGKey(12345)
  params = program.prepare_params(params)  # once, as `generate` does
  program(params, rng).block_until_ready()
  times = []
  for _ in range(max(1, repeats)):
    t0 = time.perf_counter()
    program(params, rng).block_until_ready()
    times.append(time.perf_counter() - t0)
  return statistics.median(times) * 1e3


def generate(program: samplers.SampleProgram, params, num_samples: int, seed: int,
             label: str = '', decode=None) -> np.ndarray:
  """``num_samples`` uint8 images; batch b uses the key fold_in(PRNGKey(seed), b).
  ``decode``: a latent backbone's latents -> images in [-1, 1] (`autoencoder.decoder`)."""
  base = jax.random.PRNGKey(seed)
  params = program.prepare_params(params)  # the 'stacked' path's layout, made once
  n_batches = -(-num_samples // program.batch_size)
  out, t0 = [], time.perf_counter()
  for b in range(n_batches):
    x = program(params, jax.random.fold_in(base, b))
    # Decoded where the samples are (sharded over every process's devices), then gathered.
    out.append(data.to_uint8(samplers.to_host(x if decode is None else decode(x))))
    done = min((b + 1) * program.batch_size, num_samples)
    elapsed = time.perf_counter() - t0
    eta = elapsed / (b + 1) * (n_batches - b - 1)
    print(f'  [{label}] {done}/{num_samples} samples  {elapsed:6.1f}s elapsed  ETA {eta:6.1f}s',
          flush=True)
  return np.concatenate(out)[:num_samples]


class Evaluator:
  """What every evaluation shares: backbone, sampler, FID network and reference statistics.

  Used by ``evaluate``, the ASE grid search and the experiment harness.
  """

  def __init__(self, config, out_dir: str, *, backbone: str | None = None,
               fid_method: str | None = None):
    """``fid_method``: the Fréchet method of every FID (`fid.frechet_distance`; default
    ``config.eval.fid_method``)."""
    from lees_jax import fid as fid_lib
    self.config = config
    ev = config.eval
    self.backbone_path = backbone or config.backbone
    # The backbone's recorded diffusion process must be the config's (a VP SDE U-ViT cannot be
    # sampled by a DDPM solver, nor the other way round).
    _, self.params = checkpoints.load_backbone_params(self.backbone_path, config.model,
                                                      expected_diffusion=config.diffusion)
    self.model = models.build_model(config.model, dtype=config.sampler.dtype)
    self.solver = samplers.solver_from_config(config.diffusion, config.sampler)
    # A latent backbone's samples are decoded to images before FID (DiT: vae.decode(z/0.18215)).
    self.decode = None
    if self.model.input.kind == 'latents':
      from lees_jax import autoencoder  # pylint: disable=g-import-not-at-top
      vae = autoencoder.load_vae(config)
      self.decode = autoencoder.decoder(vae.model, vae.params)
      print(f'latent backbone: samples decoded by the VAE of {vae.meta.get("source")}')
    self.mesh = data.make_mesh() if jax.device_count() > 1 else None
    self.out_dir = out_dir
    files.makedirs(out_dir)
    self.fid = fid_lib
    self.fid_method = fid_method or config.eval.get('fid_method', 'sqrtm')
    self.extractor = fid_lib.FeatureExtractor(ev.fid_weights or None, batch_size=ev.fid_batch_size)
    self._references = {}
    if ev.get('reference_stats'):  # a statistics file, e.g. ADM's ImageNet reference batch
      from lees_jax.fid import reference as fid_reference  # pylint: disable=g-import-not-at-top
      self.ref_stats = fid_reference.load_statistics(ev.reference_stats)[0]
      self.reference = f'statistics file {ev.reference_stats}'
    else:
      self.ref_stats = self.reference_stats(ev.reference_split)
      self.reference = f'{config.data.dataset}/{ev.reference_split}'
    print(f'FID reference: {self.reference}, {self.ref_stats.count} images')

  def for_sampler(self, name: str, steps: int) -> 'Evaluator':
    """This evaluator with the solver ``name`` at ``steps`` steps (the study's few-step cells):
    backbone, FID network and reference statistics are this one's, shared, not loaded again."""
    other = copy.copy(self)
    other.config = self.config.copy_and_resolve_references()
    other.config.sampler.update(name=name, steps=int(steps))
    other.solver = samplers.solver_from_config(other.config.diffusion, other.config.sampler)
    return other

  def reference_stats(self, split: str):
    """FID statistics of ``split`` of ``config.data`` (cached in the out dir, resumable)."""
    if split not in self._references:
      cache = files.join(self.out_dir,
                         f'ref_stats_{data.dataset_tag(self.config.data)}_{_safe_name(split)}.npz')
      images = data.split_images(self.config.data, split)
      # Several processes: process 0 computes and caches, the others then read its cache.
      if files.is_writer():
        self._references[split] = self.fid.load_or_compute_reference_stats(
            images, cache, extractor=self.extractor)
      files.sync(f'reference statistics {cache}')
      if not files.is_writer():
        self._references[split] = self.fid.load_or_compute_reference_stats(
            images, cache, extractor=self.extractor)
    return self._references[split]

  def program(self, policy: policies.Policy, batch_size: int) -> samplers.SampleProgram:
    path = 'soft' if policy.soft else self.config.sampler.path
    guidance = samplers.guidance_from_config(self.config.sampler)  # 1 (none) unless configured
    return samplers.compile_sampler(self.model, self.solver, policy, batch_size, path=path,
                                    mesh=self.mesh, **guidance)

  def run(self, resolved: ResolvedPolicy, seed: int, num_samples: int, *,
          program: samplers.SampleProgram | None = None, time_it: bool = True,
          reference_split: str | None = None):
    """Samples, FID (against ``reference_split``, default config.eval's) and timing of one
    (policy, seed). Returns (record, images, program)."""
    ev = self.config.eval
    ref_stats = self.ref_stats if reference_split is None else self.reference_stats(reference_split)
    reference = (self.reference if reference_split is None
                 else f'{self.config.data.dataset}/{reference_split}')
    policy = resolved.policy
    params = resolved.params if resolved.params is not None else self.params
    if program is None:
      program = self.program(policy, self.config.sampler.batch_size)
      print(f'policy {resolved.name}: path {program.path}, {len(program.segments)} segments, '
            f'executed blocks {program.block_ratio:.1%}, FLOPs {program.flop_fraction:.1%}')
    images = generate(program, params, int(num_samples), int(seed), resolved.name, self.decode)
    stats = self.fid.compute_statistics(images, extractor=self.extractor)
    fid_value = self.fid.fid_from_statistics(stats, ref_stats, method=self.fid_method)
    rec = dict(policy=resolved.name, seed=int(seed), sampler=self.solver.name,
               sampler_description=self.solver.describe(), steps=self.solver.num_steps,
               # DDPM: its variance; DDIM: its eta (what the literature's FIDs are keyed by)
               sampler_variance=(self.solver.variance if self.solver.variance is not None else
                                 float(self.config.sampler.eta) if self.solver.name == 'ddim'
                                 else None),
               num_samples=int(num_samples), fid=fid_value, fid_method=self.fid_method,
               block_ratio=program.block_ratio,
               flop_fraction=program.flop_fraction, path=program.path, segments=len(program.segments),
               reference=reference, reference_count=ref_stats.count,
               dtype=self.config.sampler.dtype, device=str(jax.devices()[0].device_kind),
               num_devices=jax.device_count())
    if time_it:
      timing = program if program.batch_size == ev.latency_batch else self.program(policy, ev.latency_batch)
      latency = time_batch(timing, params, ev.latency_repeats) * 100.0 / ev.latency_batch
      rec.update(latency_ms_per_100=latency, images_per_s=100.0 / (latency / 1e3),
                 latency_batch=int(ev.latency_batch))
    return rec, images, program

  def save_pictures(self, resolved: ResolvedPolicy, images: np.ndarray, program: samplers.SampleProgram):
    """A sample grid, and for gated policies a heat-map of the executed units."""
    from lees_jax import report
    name = _safe_name(resolved.name)
    report.save_png(report.image_grid(images[:min(100, len(images))]),
                    files.join(self.out_dir, f'samples_{name}.png'))
    policy = resolved.policy
    if isinstance(policy, policies.FullPolicy):
      return
    unit_names = [u.name for u in self.model.units]
    if isinstance(policy, policies.LeesPolicy):
      img = report.gate_heatmap(policy, unit_names, timesteps=self.solver.timesteps,
                                num_timesteps=self.solver.num_original_timesteps,
                                title=f'{resolved.name}: g_k(t), dots = executed')
    else:
      img = report.mask_heatmap(program.masks, unit_names, self.solver.timesteps,
                                num_timesteps=self.solver.num_original_timesteps,
                                title=f'{resolved.name}: executed units')
    report.save_png(img, files.join(self.out_dir, f'gates_{name}.png'))


def _done(results: list[dict], key: dict) -> bool:
  return any(all(r.get(k) == v for k, v in key.items()) for r in results)


def evaluate(config, workdir: str) -> list[dict]:
  """``config.mode=evaluate``."""
  ev = config.eval
  out_dir = files.join(workdir, 'eval')
  results_path = files.join(out_dir, 'results.json')
  results = load_results(results_path)
  evaluator = Evaluator(config, out_dir)
  writer = None
  try:
    from clu import metric_writers
    writer = metric_writers.create_default_writer(out_dir, just_logging=jax.process_index() > 0)
  except ImportError:  # CLU is optional for evaluation (e.g. on accelerator images without TF)
    pass

  for spec in ev.policies:
    resolved = resolve_policy(spec, evaluator.model, default_budget=ev.ase_budget)
    program = None
    for seed in ev.seeds:
      key = dict(policy=resolved.name, seed=int(seed), sampler=evaluator.solver.name,
                 steps=evaluator.solver.num_steps, num_samples=int(ev.num_samples))
      if _done(results, key):
        print(f'{resolved.name} seed {seed}: done earlier, skipping')
        continue
      rec, images, program = evaluator.run(resolved, seed, ev.num_samples, program=program)
      rec['policy_spec'] = spec
      results.append(rec)
      files.write_json(results_path, results)
      print(f'{resolved.name} seed {seed}: FID {rec["fid"]:.3f}  {rec["latency_ms_per_100"]:.1f} ms/100 '
            f'images  blocks {rec["block_ratio"]:.1%}  FLOPs {rec["flop_fraction"]:.1%}', flush=True)
      if writer is not None:
        writer.write_scalars(int(seed), {f'{resolved.name}/{k}': rec[k] for k in RESULT_KEYS[5:]})
      if seed == ev.seeds[0]:
        evaluator.save_pictures(resolved, images, program)
  if writer is not None:
    writer.close()
  files.sync('evaluate finished')
  print_table(results)
  return results


def run_ase_grid(config, evaluator: Evaluator, out_dir: str) -> list[dict]:
  """Every schedule of the drop-length grid (`ase.drop_grid` over config.ase's starts and
  finals), resumable (``<out_dir>/grid.jsonl``): FID on ``config.ase.grid_num_samples`` samples
  of the selection seed ``config.ase.grid_seed`` against ``config.ase.grid_reference_split``,
  FLOPs, and latency (so the ASE curve exists in latency as well as FLOPs).

  The selection seed and reference are apart from the study's: B3 is picked on samples and
  references it is not evaluated on, so its pick is not fitted to the noise of its own FID.
  """
  ac = config.ase

  def evaluate_point(point):
    resolved = ResolvedPolicy(point.name, ase.grid_policy(point, evaluator.model.units))
    rec, _, _ = evaluator.run(resolved, int(ac.grid_seed), ac.grid_num_samples,
                              reference_split=ac.grid_reference_split)
    return rec

  return ase.run_grid(ase.drop_grid(ac.grid_starts, ac.grid_finals), evaluate_point,
                      files.join(out_dir, 'grid.jsonl'))


def ase_grid(config, workdir: str) -> list[dict]:
  """``config.mode=ase_grid``: ASE drop-length grid search (B3), resumable (`run_ase_grid`).

  Writes ``W/ase_grid/grid.jsonl`` (one record per point), ``pareto.json``, ``pareto.csv``,
  ``pareto.png`` and the pick for ``config.eval.ase_budget``.
  """
  out_dir = files.join(workdir, 'ase_grid')
  evaluator = Evaluator(config, out_dir)
  records = run_ase_grid(config, evaluator, out_dir)
  front = ase.pareto_front(records)
  pick = ase.pick_for_budget(records, config.eval.ase_budget)
  files.write_json(files.join(out_dir, 'pareto.json'),
                   {'pareto': front, 'budget': config.eval.ase_budget, 'pick': pick,
                    'grid_seed': int(config.ase.grid_seed),
                    'grid_reference': f'{config.data.dataset}/{config.ase.grid_reference_split}'})
  names = {r['name'] for r in front}
  files.write_text(files.join(out_dir, 'pareto.csv'), ''.join(
      ['name,start,final,flop_fraction,block_ratio,latency_ms_per_100,fid,on_pareto\n'] +
      [f'{r["name"]},{r["start"]},{r["final"]:.4f},{r["flop_fraction"]:.4f},'
       f'{r["block_ratio"]:.4f},{r["latency_ms_per_100"]:.2f},{r["fid"]:.4f},'
       f'{int(r["name"] in names)}\n' for r in records]))
  from lees_jax import report
  report.save_png(report.pareto_plot(records, front, pick), files.join(out_dir, 'pareto.png'))
  print(f'ASE grid: {len(records)} schedules, Pareto set {[r["name"] for r in front]}; '
        f'pick for FLOP budget {config.eval.ase_budget}: {pick["name"]} (FID {pick["fid"]:.3f}, '
        f'FLOPs {pick["flop_fraction"]:.1%})')
  return records


def print_table(results: list[dict]):
  print(f'\n{"policy":<28} {"seed":>4} {"FID":>8} {"ms/100":>9} {"img/s":>8} {"blocks":>7} {"FLOPs":>7}')
  for r in results:
    print(f'{r["policy"]:<28} {r["seed"]:>4} {r["fid"]:>8.3f} {r["latency_ms_per_100"]:>9.1f} '
          f'{r["images_per_s"]:>8.1f} {r["block_ratio"]:>7.1%} {r["flop_fraction"]:>7.1%}')
