"""Cross-device batch statistics (`axis_name`) under jax.pmap over 8 CPU devices.

Forcing 8 host devices has to happen before JAX initialises, so the checks run in a
fresh interpreter; the rest of the test suite keeps its single device.
"""

import os
import subprocess
import sys
import textwrap

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHECKS = textwrap.dedent('''
    import jax
    import jax.numpy as jnp
    import numpy as np
    from bn_research import normalization as bn

    N, EPS = 8, 1e-5
    assert jax.device_count() == N, jax.devices()
    rng = np.random.default_rng(0)

    def rand(*shape, loc=0.0):
      return (loc + rng.normal(size=shape)).astype(np.float32)

    def shard(x):
      return x.reshape((N, x.shape[0] // N) + x.shape[1:])

    def close(a, b, tol=1e-4):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol, atol=tol)

    # 1. batch_norm with axis_name == batch_norm over the concatenated batch: outputs,
    #    statistics and gradients; dense and NHWC, including one example per device.
    for shape, axes in (((32, 3), (0,)), ((16, 3, 2, 4), (0, 1, 2)), ((8, 5), (0,))):
      x, ct = rand(*shape, loc=2.0), rand(*shape)
      gamma, beta = rand(shape[-1], loc=1.0), rand(shape[-1])

      def per_device(x, ct):
        def loss(x, gamma, beta):
          y, mean, var = bn.batch_norm(x, gamma, beta, axes=axes, epsilon=EPS,
                                       axis_name='d')
          return jnp.sum(y * ct), (y, mean, var)
        (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(
            x, gamma, beta)
        return out, grads

      (y, mean, var), (dx, dgamma, dbeta) = jax.pmap(per_device, axis_name='d')(
          shard(x), shard(ct))

      def global_loss(x, gamma, beta):
        y, mean, var = bn.batch_norm(x, gamma, beta, axes=axes, epsilon=EPS)
        return jnp.sum(y * ct), (y, mean, var)
      (_, (y_ref, mean_ref, var_ref)), (dx_ref, dgamma_ref, dbeta_ref) = (
          jax.value_and_grad(global_loss, argnums=(0, 1, 2), has_aux=True)(
              x, gamma, beta))
      close(y.reshape(shape), y_ref)
      for i in range(N):  # every device sees the pooled statistics
        close(mean[i], mean_ref)
        close(var[i], var_ref)
      close(var_ref, np.asarray(x, np.float64).var(axis=axes))
      # Each device gets its rows of the concatenated batch's gradient; the parameter
      # gradients are per device (sum them, as data-parallel training does).
      close(dx.reshape(shape), dx_ref, 1e-3)
      close(np.sum(dgamma, axis=0), dgamma_ref, 1e-3)
      close(np.sum(dbeta, axis=0), dbeta_ref, 1e-3)
    print('batch_norm ok')

    # 2. The module: outputs and moving averages equal a single-device BatchNorm on
    #    the concatenated batch (m = 32 for the unbiased factor), replicated everywhere.
    x = rand(32, 4, loc=-1.0)
    plain = bn.BatchNorm(momentum=0.5)
    variables = plain.init(jax.random.PRNGKey(0), x, use_running_average=True)
    y_ref, upd_ref = plain.apply(variables, x, use_running_average=False,
                                 mutable=['batch_stats'])
    mapped = bn.BatchNorm(momentum=0.5, axis_name='d')
    rep = jax.tree_util.tree_map(lambda a: jnp.stack([a] * N), variables)
    y, upd = jax.pmap(lambda v, x: mapped.apply(v, x, use_running_average=False,
                                                mutable=['batch_stats']),
                      axis_name='d')(rep, shard(x))
    close(y.reshape(x.shape), y_ref)
    for i in range(N):
      close(upd['batch_stats']['mean'][i], upd_ref['batch_stats']['mean'], 1e-5)
      close(upd['batch_stats']['var'][i], upd_ref['batch_stats']['var'], 1e-5)
    print('module ok')

    # 3. Virtual batches under pmap: each device normalizes its own groups of
    #    virtual_batch_size consecutive examples (no pooling across devices).
    for shape in ((32, 3), (16, 2, 2, 3)):
      vbs = 2
      x = rand(*shape, loc=1.0)
      x[::4] += 5.0
      module = bn.BatchNorm(momentum=0.5, axis_name='d', virtual_batch_size=vbs)
      variables = module.init(jax.random.PRNGKey(0), x[:4], use_running_average=True)
      rep = jax.tree_util.tree_map(lambda a: jnp.stack([a] * N), variables)
      y, upd = jax.pmap(lambda v, x: module.apply(v, x, use_running_average=False,
                                                  mutable=['batch_stats']),
                        axis_name='d')(rep, shard(x))
      axes = tuple(range(len(shape) - 1))
      groups = [np.asarray(x[i:i + vbs], np.float64) for i in range(0, shape[0], vbs)]
      expected = np.concatenate([
          (g - g.mean(axis=axes)) / np.sqrt(g.var(axis=axes) + EPS) for g in groups])
      close(y.reshape(shape), expected)
      m = np.prod(groups[0].shape[:-1])
      mean_ref = np.mean([g.mean(axis=axes) for g in groups], axis=0)
      var_ref = m / (m - 1) * np.mean([g.var(axis=axes) for g in groups], axis=0)
      for i in range(N):
        close(upd['batch_stats']['mean'][i], 0.5 * mean_ref, 1e-5)
        close(upd['batch_stats']['var'][i], 0.5 + 0.5 * var_ref, 1e-5)
    print('virtual ok')
''')


def test_axis_name_under_pmap_on_8_devices():
  env = dict(os.environ)
  env['XLA_FLAGS'] = (env.get('XLA_FLAGS', '') +
                      ' --xla_force_host_platform_device_count=8').strip()
  env['JAX_PLATFORMS'] = 'cpu'
  env['PYTHONPATH'] = os.pathsep.join(filter(None, [REPO, env.get('PYTHONPATH')]))
  result = subprocess.run([sys.executable, '-c', CHECKS], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stdout + result.stderr
  assert result.stdout.split() == ['batch_norm', 'ok', 'module', 'ok', 'virtual', 'ok']
