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


def print_table(records: list[dict], columns) -> None:
  """Prints one row per record. ``columns``: (header, value, format spec) triples, where value
  is a record key or a function of the record and the spec is a format such as '<10' or
  '>6.1%' (its alignment and width also place the header)."""
  def width(spec):
    digits = ''.join(c for c in spec[1:].split('.')[0] if c.isdigit())
    return spec[0] + digits

  print(' '.join(f'{header:{width(spec)}}' for header, _, spec in columns))
  for r in records:
    print(' '.join(f'{(value(r) if callable(value) else r[value]):{spec}}'
                   for _, value, spec in columns))


def write_records(path: str | None, records) -> None:
  """Writes the records as indented JSON (when a path is given) and says where."""
  if path:
    import json  # pylint: disable=g-import-not-at-top
    with open(path, 'w') as f:
      json.dump(records, f, indent=1)
    print(f'wrote {path}')
