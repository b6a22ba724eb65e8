"""Timing helpers every benchmark shares. Imports only the standard library: the benchmarks
run on accelerator images without TensorFlow, CLU or ml_collections."""

from __future__ import annotations

import statistics
import time


def compile_program(prog, params, rng):
  """(compiled program, seconds its lowering and compilation took)."""
  t0 = time.perf_counter()
  compiled = prog.lower(params, rng).compile()
  return compiled, time.perf_counter() - t0


def interleaved_times(runs: dict, repeats: int) -> dict[str, list[float]]:
  """Seconds of every repeat of each run, the runs timed in turn (A B C A B C ...) after one
  warm-up each, so that load drifts hit all alike."""
  for run in runs.values():
    run()  # warm-up
  times = {name: [] for name in runs}
  for _ in range(repeats):
    for name, run in runs.items():
      t0 = time.perf_counter()
      run()
      times[name].append(time.perf_counter() - t0)
  return times


def interleaved_medians(runs: dict, repeats: int) -> dict[str, float]:
  """Median seconds of each run, timed as `interleaved_times` does."""
  return {name: statistics.median(ts) for name, ts in interleaved_times(runs, repeats).items()}
