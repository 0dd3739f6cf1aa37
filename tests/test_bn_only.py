"""Training only the normalizers' gamma and beta (optimizer.trainable='batch_norm')."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bn_research import optim
from bn_research.config import base_config
from tests import helpers

pytestmark = pytest.mark.usefixtures('fast_compiles')


def leaves(tree):
  return {jax.tree_util.keystr(p): np.asarray(v)
          for p, v in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.mark.parametrize('normalizer', ['batch_norm', 'group_norm'])
def test_only_normalizer_parameters_move_and_carry_optimizer_state(normalizer):
  from bn_research import models
  c = base_config()
  c.model.normalizer, c.model.hidden_sizes, c.model.norm_groups = normalizer, (8, 8), 2
  c.optimizer.trainable, c.optimizer.weight_decay = 'batch_norm', 0.01
  model = models.build_model(c.model, num_classes=3)
  variables = model.init(jax.random.PRNGKey(0), jnp.ones((2, 5)), train=False)
  params = variables['params']
  tx = optim.make_optimizer(c.optimizer, params, variables.get('batch_stats'))
  state = tx.init(params)
  grads = jax.tree_util.tree_map(lambda p: jnp.ones_like(p), params)
  for _ in range(2):
    updates, state = tx.update(grads, state, params)
    params = jax.tree_util.tree_map(lambda p, u: p + u, params, updates)
  before, after = leaves(variables['params']), leaves(params)
  moved = sorted(k for k in before if not np.array_equal(before[k], after[k]))
  assert moved == sorted(k for k in before if "['bn_" in k) and moved
  # Momentum buffers exist for gamma and beta only (2 per normalizer layer).
  traces = [x for x in jax.tree_util.tree_leaves(state) if np.ndim(x) == 1]
  assert len(traces) == 4


def test_bn_only_training_leaves_every_other_parameter_bitwise_at_init(tmp_path):
  """After 2 and after 5 steps of the engine, the frozen parameters are the same bits

  (a working mask keeps them at their init; a broken one would move them every step),
  while BN's gamma and beta moved between the two.
  """
  from bn_research import rundir, train
  final = {}
  for steps in (2, 5):
    config = helpers.tiny_mlp_config(**{
        'optimizer.trainable': 'batch_norm', 'optimizer.weight_decay': 1e-3,
        'num_train_steps': steps, 'eval_every_steps': steps, 'log_every_steps': steps,
        'checkpoint_every_steps': steps, 'steps_per_dispatch': steps,
        'probe.enabled': False})
    workdir = str(tmp_path / f'steps{steps}')
    assert train.train_and_evaluate(config, workdir)['status'] == 'done'
    final[steps] = rundir.load_latest(workdir)
  one, four = leaves(final[2]['params']), leaves(final[5]['params'])
  normalizer = sorted(k for k in one if "['bn_" in k)
  frozen = sorted(set(one) - set(normalizer))
  assert len(normalizer) == 4 and "['logits']['kernel']" in frozen
  for k in frozen:
    assert np.array_equal(one[k], four[k]), k
  for k in normalizer:
    assert not np.array_equal(one[k], four[k]), k
  # No optimizer state for the frozen parameters.
  opt = [np.asarray(x) for x in jax.tree_util.tree_leaves(final[5]['opt_state'])]
  assert sum(x.size for x in opt if x.ndim) == sum(one[k].size for k in normalizer)


def test_bn_only_needs_a_normalizer():
  from bn_research.config import validate_config
  c = helpers.tiny_mlp_config(**{'optimizer.trainable': 'batch_norm',
                                 'model.normalizer': 'none'})
  with pytest.raises(ValueError, match="optimizer.trainable='batch_norm'"):
    validate_config(c)
  c = helpers.tiny_mlp_config(**{'optimizer.trainable': 'bn'})
  with pytest.raises(ValueError, match="optimizer.trainable='bn'") as err:
    validate_config(c)
  assert 'all' in str(err.value) and 'batch_norm' in str(err.value)
