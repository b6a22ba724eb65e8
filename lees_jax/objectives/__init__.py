"""Training objectives: what `lees_jax.train`'s one loop trains, with which loss and optimiser.

* `pretrain` -- eps-prediction of the whole backbone (``config.mode=pretrain``);
* `lees_gates` -- LEES: the 2K gate scalars on a frozen backbone (``train_gates``);
* `ase_finetune` -- the ASE baseline: the backbone under a fixed drop schedule (``ase_finetune``);
* `learning_to_cache` -- Learning-to-Cache's per-step reuse router on a frozen backbone
  (``train_l2c``);
* `lees_reuse` -- three-choice LEES: run / reuse residual / skip as functions of t
  (``train_lees3``).

Each is a function ``config -> Objective`` (see `base.Objective`); `OBJECTIVES` maps the mode
name to it. A new objective is one more such function and one entry here. How each noises its
examples -- the draw, the network's and the gates' time, the loss terms -- is the backbone's
diffusion process (`lees_jax.processes`, from ``config.diffusion.process``), never branched on here.
"""

from lees_jax.objectives.ase_finetune import (ASE_REWEIGHTS, ASE_SCHEDULE_FILE, ase_lambda,
                                              ase_objective, ase_time_weight, load_ase_finetuned)
from lees_jax.objectives.base import (CHECKPOINT_DIR, Objective, batch_labels, draw_t_noise, merge,
                                      num_steps, partition, sampler_timesteps)
from lees_jax.objectives.learning_to_cache import l2c_loss_fn, l2c_objective
from lees_jax.objectives.lees_gates import GATES_FILE, gate_loss_fn, gates_objective
from lees_jax.objectives.lees_reuse import lees3_loss_fn, lees3_objective
from lees_jax.objectives.pretrain import pretrain_objective

OBJECTIVES = {'pretrain': pretrain_objective, 'train_gates': gates_objective,
              'ase_finetune': ase_objective, 'train_l2c': l2c_objective,
              'train_lees3': lees3_objective}

__all__ = ['ASE_REWEIGHTS', 'ASE_SCHEDULE_FILE', 'CHECKPOINT_DIR', 'GATES_FILE', 'OBJECTIVES',
           'Objective', 'ase_lambda', 'ase_objective', 'ase_time_weight', 'batch_labels', 'draw_t_noise',
           'gate_loss_fn', 'gates_objective', 'l2c_loss_fn', 'l2c_objective', 'lees3_loss_fn',
           'lees3_objective', 'load_ase_finetuned', 'merge', 'num_steps', 'partition',
           'pretrain_objective', 'sampler_timesteps']
