"""The 'stacked' sampling path's view of a backbone: its gateable units as stacks of identical
blocks, run by loops over the kept blocks only (``model.stack``, `Stack`).

DiT's blocks are one stack; U-ViT's are two, its in-blocks with the mid-block and its
out-blocks, linked by the long skips (`BlockStack.record` hands the first stack's outputs to
the second, whose `BlockStack.mix` -- the skip linear ASE keeps -- runs for every out-block).
Each stack's block parameters are stacked on a leading depth axis and one compiled program
serves every mask: the mask is data, a loop's trip count, not a trace-time constant, and a
skipped block is neither traced nor computed (DESIGN: the scan-over-layers layout).

`lees_jax.models.backbone.call` runs `Stack.forward` when ``gates=`` is a `StackMask`;
`lees_jax.samplers` builds those on path 'stacked'.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class BlockOutputs:
  """What a stack run over its kept blocks hands on (`BlockStack.record`): ``at(i)`` is block
  i's output, or its input when block i was skipped (the output of the last kept block before
  it, or the stack's input)."""
  buffer: jax.Array     # (depth + 1, ...): the stack's input, then the kept blocks' outputs
  positions: jax.Array  # (depth,) int32: block i's output is buffer[positions[i]]

  def at(self, i):
    return jax.lax.dynamic_index_in_dim(self.buffer, self.positions[i], keepdims=False)


@dataclasses.dataclass(frozen=True)
class BlockStack:
  """One stack of identical blocks: consecutive gateable units whose parameters
  ``params[names[i]]`` are subtrees of one structure and shape, run by a loop over the kept
  blocks only (`run`). A kept block i computes ``h = block(p_i, h, ctx)``; a skipped one
  nothing, unless:

  * ``mix(p_i, h, ctx, i) -> h`` is given: a part of every block that runs whether the block
    is kept or not, before its ``block`` (U-ViT's out-blocks: the skip linear on the long skip,
    which ASE keeps). Between two kept blocks the loop applies the skipped blocks' mixes (an
    inner loop over them), so a skipped block still computes nothing of ``block``;
  * ``record(ctx, outputs) -> ctx`` is given: the stack hands every block's output to the
    stacks after it, as `BlockOutputs` in the context (U-ViT's in-blocks: the long skips).

  ``h`` is one array; mix and record together are not supported (no backbone needs them).
  """
  name: str  # the stacked layout's key is 'stacked_<name>' (`layout_key`)
  names: tuple[str, ...]
  block: Callable[[Any, Any, Any], Any]  # (block params, h, ctx) -> h
  mix: Callable[[Any, Any, Any, Any], Any] | None = None  # (block params, h, ctx, i) -> h
  record: Callable[[Any, BlockOutputs], Any] | None = None  # (ctx, outputs) -> ctx

  def __post_init__(self):
    if self.mix is not None and self.record is not None:
      raise ValueError(f'stack {self.name!r}: mix and record together are not supported')

  @property
  def depth(self) -> int:
    return len(self.names)

  @property
  def layout_key(self) -> str:
    return f'stacked_{self.name}'

  def stacked_params(self, params):
    """The blocks' parameter subtrees as one tree of arrays with a leading (depth,) axis."""
    missing = [n for n in self.names if n not in params]
    if missing:
      raise ValueError(f'params have no block subtrees {missing} (expected {self.names[0]}..'
                       f'{self.names[-1]})')
    return jax.tree_util.tree_map(lambda *leaves: jnp.stack(leaves),
                                  *[params[n] for n in self.names])

  def kept_indices(self, keep) -> tuple[jax.Array, jax.Array]:
    """(indices (depth,) int32, count) of a traced (depth,) keep vector: the kept block
    indices in order, padded with 0 after the first ``count``."""
    keep = jnp.asarray(keep, bool)
    if keep.shape != (self.depth,):
      raise ValueError(f'the keep vector must be ({self.depth},) booleans (one per block of the '
                       f'stack), got shape {keep.shape}')
    indices = jnp.nonzero(keep, size=self.depth, fill_value=0)[0].astype(jnp.int32)
    return indices, jnp.sum(keep, dtype=jnp.int32)

  def run(self, stacked, h, ctx, keep):
    """(h, ctx) after the stack with the blocks of ``keep`` (traced, (depth,)): a
    ``fori_loop`` of ``count`` iterations, iteration j applying ``block`` to the stacked
    parameters at the j-th kept index (dynamic-indexed: one block body in the program)."""
    indices, count = self.kept_indices(keep)

    def params_at(i):
      return jax.tree_util.tree_map(
          lambda a: jax.lax.dynamic_index_in_dim(a, i, keepdims=False), stacked)

    if self.mix is not None:
      def mixes(start, stop, h):  # blocks start..stop-1's mix (a traced range)
        return jax.lax.fori_loop(start, stop, lambda i, h: self.mix(params_at(i), h, ctx, i), h)

      def mix_and_block(j, carry):  # the mixes up to kept block k, then its block
        h, start = carry
        k = indices[j]
        return self.block(params_at(k), mixes(start, k + 1, h), ctx), k + 1

      h, start = jax.lax.fori_loop(0, count, mix_and_block, (h, jnp.int32(0)))
      return mixes(start, self.depth, h), ctx
    if self.record is None:
      return jax.lax.fori_loop(0, count, lambda j, h: self.block(params_at(indices[j]), h, ctx),
                               h), ctx

    def block_and_record(j, carry):
      h, buffer = carry
      h = self.block(params_at(indices[j]), h, ctx)
      return h, jax.lax.dynamic_update_index_in_dim(buffer, h, j + 1, 0)

    buffer = jnp.zeros((self.depth + 1,) + h.shape, h.dtype).at[0].set(h)
    h, buffer = jax.lax.fori_loop(0, count, block_and_record, (h, buffer))
    # Block i's output is the one after the kept blocks among 0..i, the input if there are none.
    positions = jnp.cumsum(jnp.asarray(keep, jnp.int32))
    return h, self.record(ctx, BlockOutputs(buffer, positions))


@dataclasses.dataclass(frozen=True)
class Stack:
  """A backbone whose gateable units are stacks of identical blocks (``model.stack``): DiT one
  (its blocks), U-ViT two (in- and mid-blocks, out-blocks). The stacks cover units 0..K-1 in
  order, and the forward pass with the keep vector (K,) is

      h, ctx = prologue(params, x, t, y)      # y None for an unconditional backbone
      h, ctx = stack.run(stacked[stack.layout_key], h, ctx, keep[its units])  # each stack
      out = epilogue(params, h, ctx)          # = model.apply(..., gates=StaticMask(keep))

  `forward` runs it with each stack's block parameters stacked on a leading depth axis
  (`stacked_params`) and a loop over its kept indices only: one block body per stack in the
  program, trip counts that are data (the numbers kept), nothing computed for a skipped block.

  Stacking copies every block's parameters. `prepare` makes the *stacked layout* once (the
  params without the block subtrees, plus ``params['stacked_<name>']`` per stack), which
  `split` reads as it is; from the ordinary layout `split` stacks (inside the caller's
  program, at every call). The layout of saved checkpoints is the ordinary one.
  """
  prologue: Callable[[Any, Any, Any, Any], tuple[Any, Any]]  # (params, x, t, y) -> (h, ctx)
  stacks: tuple[BlockStack, ...]
  epilogue: Callable[[Any, Any, Any], Any]                   # (params, h, ctx) -> output

  @property
  def names(self) -> tuple[str, ...]:
    """The blocks' parameter subtrees, unit k = names[k]."""
    return tuple(n for stack in self.stacks for n in stack.names)

  @property
  def depth(self) -> int:
    return len(self.names)

  def stacked_params(self, params) -> dict:
    """{'stacked_<name>': that stack's blocks stacked (`BlockStack.stacked_params`)}."""
    return {s.layout_key: s.stacked_params(params) for s in self.stacks}

  def _is_stacked(self, params) -> bool:
    present = [s.layout_key in params for s in self.stacks]
    if any(present) and not all(present):
      raise ValueError(f'params hold some stacked layouts but not all of '
                       f'{[s.layout_key for s in self.stacks]}')
    return all(present)

  def prepare(self, params):
    """The stacked layout of ordinary ``params`` (already stacked ones are returned as they
    are)."""
    if self._is_stacked(params):
      return params
    names = set(self.names)
    return {**{k: v for k, v in params.items() if k not in names}, **self.stacked_params(params)}

  def split(self, params):
    """(params, stacked block params) of either layout (the ordinary one is stacked here)."""
    if self._is_stacked(params):
      return params, {s.layout_key: params[s.layout_key] for s in self.stacks}
    return params, self.stacked_params(params)

  def kept_indices(self, keep) -> list[tuple[jax.Array, jax.Array]]:
    """Each stack's (kept indices, count) (`BlockStack.kept_indices`) of a (K,) keep vector."""
    return [stack.kept_indices(part) for stack, part in zip(self.stacks, self._parts(keep))]

  def _parts(self, keep) -> list[jax.Array]:
    keep = jnp.asarray(keep, bool)
    if keep.shape != (self.depth,):
      raise ValueError(f'the keep vector must be ({self.depth},) booleans (one per block of the '
                       f'stacks), got shape {keep.shape}')
    bounds = np.cumsum([0] + [s.depth for s in self.stacks])
    return [keep[a:b] for a, b in zip(bounds[:-1], bounds[1:])]

  def forward(self, params, stacked, x, t, y, keep):
    """The backbone's output with the blocks of ``keep`` (traced, (K,)) only."""
    h, ctx = self.prologue(params, x, t, y)
    for stack, part in zip(self.stacks, self._parts(keep)):
      h, ctx = stack.run(stacked[stack.layout_key], h, ctx, part)
    return self.epilogue(params, h, ctx)


def stack_of(model, paths=None) -> Stack:
  """``model.stack``, or a ValueError saying which sampling ``paths`` the backbone can use."""
  stack = getattr(model, 'stack', None)
  if stack is None:
    usable = ', '.join(repr(p) for p in (paths or ('segments', 'cond')))
    raise ValueError(f"sampling path 'stacked' needs a backbone whose gateable units are stacks "
                     f'of identical blocks (model.stack, e.g. DiT, U-ViT); {type(model).__name__} '
                     f'has none: use path {usable}')
  if stack.depth != model.num_units:
    raise ValueError(f'{type(model).__name__}.stack has {stack.depth} blocks but the model has '
                     f'{model.num_units} gateable units: the stacked path needs unit k = block k')
  return stack


@flax.struct.dataclass
class StackMask:
  """The 'stacked' path's ``gates=``: the stack's parameters (`Stack.stacked_params`) and a
  traced (K,) keep vector for the whole batch; `predict_eps` then runs `Stack.forward`."""
  stacked: Any
  keep: jax.Array
