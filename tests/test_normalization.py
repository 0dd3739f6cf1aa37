"""Algorithm 1 (the Batch Normalizing Transform): values, gradients, paper properties.

The oracles are float64 NumPy transcriptions of the paper: the forward pass of
Algorithm 1 and the chain rule of Section 3 (dl/dxhat, dl/dvar, dl/dmu, dl/dx,
dl/dgamma, dl/dbeta), plus numerical differentiation (`check_grads`).
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import helpers
from jax.test_util import check_grads

from bn_research import normalization as bn

EPS = 1e-5
# (shape, axes): dense (batch, features) and NHWC convolution (batch, h, w, channels).
LAYOUTS = {
    'dense': ((24, 7), (0,)),
    'conv': ((4, 5, 3, 6), (0, 1, 2)),
}


def random_inputs(seed, shape, dtype=np.float32):
  """Activations with a non-zero, per-feature mean and spread, and non-trivial gamma/beta."""
  rng = np.random.default_rng(seed)
  features = shape[-1]
  loc = rng.uniform(-4.0, 4.0, size=features)
  spread = rng.uniform(0.3, 3.0, size=features)
  x = loc + spread * rng.normal(size=shape)
  gamma = rng.uniform(0.5, 2.0, size=features) * rng.choice([-1.0, 1.0], size=features)
  beta = rng.normal(size=features)
  cotangent = rng.normal(size=shape)
  return tuple(a.astype(dtype) for a in (x, gamma, beta, cotangent))


np_batch_norm = helpers.np_batch_norm


def np_batch_norm_grads(x, gamma, dy, axes, eps):
  """The paper's Section 3 chain rule, term by term, in float64."""
  x, gamma, dy = (np.asarray(a, np.float64) for a in (x, gamma, dy))
  m = np.prod([x.shape[a] for a in axes])
  mu = x.mean(axis=axes, keepdims=True)
  var = ((x - mu) ** 2).mean(axis=axes, keepdims=True)
  xhat = (x - mu) / np.sqrt(var + eps)
  dxhat = dy * gamma
  dvar = np.sum(dxhat * (x - mu) * -0.5 * (var + eps) ** -1.5, axis=axes, keepdims=True)
  dmu = (np.sum(dxhat * -1.0 / np.sqrt(var + eps), axis=axes, keepdims=True)
         + dvar * np.sum(-2.0 * (x - mu), axis=axes, keepdims=True) / m)
  dx = dxhat / np.sqrt(var + eps) + dvar * 2.0 * (x - mu) / m + dmu / m
  dgamma = np.sum(dy * xhat, axis=axes)
  dbeta = np.sum(dy, axis=axes)
  return dx, dgamma, dbeta


@functools.partial(jax.jit, static_argnames=('axes', 'eps'))
def loss_grads(x, gamma, beta, cotangent, axes, eps=EPS):
  """(dl/dx, dl/dgamma, dl/dbeta) for l = sum(BN(x) * cotangent)."""
  def loss(x, gamma, beta):
    y, _, _ = bn.batch_norm(x, gamma, beta, axes=axes, epsilon=eps)
    return jnp.sum(y * cotangent)
  return jax.grad(loss, argnums=(0, 1, 2))(x, gamma, beta)


# ----------------------------------------------------------------------------------
# Forward pass.


@pytest.mark.parametrize('layout', sorted(LAYOUTS))
@pytest.mark.parametrize('seed', [0, 1])
def test_forward_matches_numpy_algorithm_1(layout, seed):
  shape, axes = LAYOUTS[layout]
  x, gamma, beta, _ = random_inputs(seed, shape)
  y, mean, var = bn.batch_norm(jnp.asarray(x), gamma, beta, axes=axes, epsilon=EPS)
  y_ref, mu_ref, var_ref, _ = np_batch_norm(x, gamma, beta, axes, EPS)
  assert y.shape == x.shape and y.dtype == jnp.float32
  assert mean.shape == var.shape == (shape[-1],)
  np.testing.assert_allclose(mean, mu_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(var, var_ref, rtol=1e-5)
  np.testing.assert_allclose(y, y_ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('layout', sorted(LAYOUTS))
def test_forward_float64_is_exact(layout):
  shape, axes = LAYOUTS[layout]
  with jax.enable_x64(True):
    x, gamma, beta, _ = random_inputs(2, shape, np.float64)
    y, mean, var = bn.batch_norm(jnp.asarray(x), gamma, beta, axes=axes, epsilon=EPS)
    assert y.dtype == jnp.float64 and var.dtype == jnp.float64
    y_ref, mu_ref, var_ref, _ = np_batch_norm(x, gamma, beta, axes, EPS)
    np.testing.assert_allclose(mean, mu_ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(var, var_ref, rtol=1e-12)
    np.testing.assert_allclose(y, y_ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize('layout', sorted(LAYOUTS))
def test_batch_moments_match_numpy(layout):
  shape, axes = LAYOUTS[layout]
  x, _, _, _ = random_inputs(3, shape)
  mean, var = bn.batch_moments(jnp.asarray(x), axes=axes)
  _, mu_ref, var_ref, _ = np_batch_norm(x, 1.0, 0.0, axes, EPS)
  np.testing.assert_allclose(mean, mu_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(var, var_ref, rtol=1e-5)


def test_variance_is_accurate_when_mean_dwarfs_std():
  # |mean| / std = 1e4: the textbook E[x^2] - E[x]^2 in float32 loses every digit here.
  rng = np.random.default_rng(4)
  x = (1e4 + rng.normal(size=(256, 5))).astype(np.float32)
  _, var = bn.batch_moments(jnp.asarray(x), axes=(0,))
  var_ref = np.asarray(x, np.float64).var(axis=0)
  np.testing.assert_allclose(var, var_ref, rtol=1e-3)
  assert np.all(np.asarray(var) >= 0)


def test_low_precision_input_keeps_dtype_and_float32_statistics():
  x, gamma, beta, _ = random_inputs(5, (32, 6))
  y, mean, var = bn.batch_norm(jnp.asarray(x, jnp.bfloat16), gamma, beta, axes=(0,),
                               epsilon=EPS)
  assert y.dtype == jnp.bfloat16
  assert mean.dtype == var.dtype == jnp.float32
  y_ref, _, _, _ = np_batch_norm(np.asarray(jnp.asarray(x, jnp.bfloat16), np.float64),
                                 gamma, beta, (0,), EPS)
  np.testing.assert_allclose(np.asarray(y, np.float32), y_ref, rtol=3e-2, atol=3e-2)


def test_scale_and_bias_none_mean_gamma_one_beta_zero():
  x, _, _, _ = random_inputs(6, (16, 4))
  y, _, _ = bn.batch_norm(jnp.asarray(x), None, None, axes=(0,), epsilon=EPS)
  y_ref, _, _, _ = np_batch_norm(x, 1.0, 0.0, (0,), EPS)
  np.testing.assert_allclose(y, y_ref, rtol=1e-4, atol=1e-4)


def test_other_reduction_layouts():
  # Statistics per (h, w, c) position over the batch only: gamma shaped like x without
  # the reduced axis; and negative axes.
  rng = np.random.default_rng(7)
  x = (2.0 + rng.normal(size=(10, 3, 2, 4))).astype(np.float32)
  gamma = rng.normal(size=(3, 2, 4)).astype(np.float32)
  beta = rng.normal(size=(3, 2, 4)).astype(np.float32)
  y, mean, var = bn.batch_norm(jnp.asarray(x), gamma, beta, axes=(0,), epsilon=EPS)
  y_ref, mu_ref, var_ref, _ = np_batch_norm(x, gamma, beta, (0,), EPS)
  assert mean.shape == (3, 2, 4)
  np.testing.assert_allclose(y, y_ref, rtol=1e-4, atol=1e-4)
  y2, _, _ = bn.batch_norm(jnp.asarray(x), None, None, axes=(-4, -3, -2), epsilon=EPS)
  y2_ref, _, _, _ = np_batch_norm(x, 1.0, 0.0, (0, 1, 2), EPS)
  np.testing.assert_allclose(y2, y2_ref, rtol=1e-4, atol=1e-4)


def test_batch_norm_is_jittable():
  x, gamma, beta, _ = random_inputs(8, (12, 3))
  fn = jax.jit(lambda x, g, b: bn.batch_norm(x, g, b, axes=(0,), epsilon=EPS))
  y, _, _ = fn(jnp.asarray(x), gamma, beta)
  y_ref, _, _, _ = np_batch_norm(x, gamma, beta, (0,), EPS)
  np.testing.assert_allclose(y, y_ref, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------
# Gradients.


@pytest.mark.parametrize('layout', sorted(LAYOUTS))
def test_gradients_match_paper_chain_rule_float64(layout):
  shape, axes = LAYOUTS[layout]
  with jax.enable_x64(True):
    x, gamma, beta, dy = random_inputs(10, shape, np.float64)
    dx, dgamma, dbeta = loss_grads(jnp.asarray(x), jnp.asarray(gamma), jnp.asarray(beta),
                                   jnp.asarray(dy), axes)
    dx_ref, dgamma_ref, dbeta_ref = np_batch_norm_grads(x, gamma, dy, axes, EPS)
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(dgamma, dgamma_ref, rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(dbeta, dbeta_ref, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize('layout', sorted(LAYOUTS))
def test_gradients_match_paper_chain_rule_float32(layout):
  shape, axes = LAYOUTS[layout]
  x, gamma, beta, dy = random_inputs(11, shape)
  dx, dgamma, dbeta = loss_grads(jnp.asarray(x), gamma, beta, jnp.asarray(dy), axes)
  dx_ref, dgamma_ref, dbeta_ref = np_batch_norm_grads(x, gamma, dy, axes, EPS)
  scale = np.abs(dx_ref).max()
  np.testing.assert_allclose(dx, dx_ref, rtol=1e-3, atol=1e-4 * scale)
  np.testing.assert_allclose(dgamma, dgamma_ref, rtol=1e-3, atol=1e-3)
  np.testing.assert_allclose(dbeta, dbeta_ref, rtol=1e-4, atol=1e-4)


def test_gradients_flow_through_mean_and_variance():
  # Ignoring mu_B and var_B's dependence on x (Section 2's failure mode) gives
  # gamma / sqrt(var + eps) * dy, which differs from the true gradient.
  with jax.enable_x64(True):
    x, gamma, beta, dy = random_inputs(12, (16, 3), np.float64)
    dx, _, _ = loss_grads(jnp.asarray(x), gamma, beta, jnp.asarray(dy), (0,), eps=1e-12)
    naive = gamma / np.sqrt(x.var(axis=0) + EPS) * dy
    assert np.abs(np.asarray(dx) - naive).max() > 1e-2 * np.abs(naive).max()
    # The true gradient is orthogonal to shifting / rescaling the batch per feature
    # (exactly so as eps -> 0).
    xhat = (x - x.mean(0)) / x.std(0)
    np.testing.assert_allclose(np.sum(np.asarray(dx), axis=0), 0.0, atol=1e-10)
    np.testing.assert_allclose(np.sum(np.asarray(dx) * xhat, axis=0), 0.0, atol=1e-8)


def flat_outputs(fn):
  """fn's outputs (y, mean, var) as one vector, jitted: check_grads then compiles once."""
  return jax.jit(lambda *args: jnp.concatenate([jnp.ravel(o) for o in fn(*args)]))


@pytest.mark.parametrize('layout', sorted(LAYOUTS))
def test_check_grads_numerically_float64(layout):
  axes = LAYOUTS[layout][1]
  small = {'dense': (6, 3), 'conv': (2, 3, 2, 3)}[layout]
  with jax.enable_x64(True):
    x, gamma, beta, _ = random_inputs(13, small, np.float64)
    # All three outputs (y, mean, var), to second order (in both modes for dense; in
    # reverse mode only for conv, to save compile time), first order in both modes.
    fn = flat_outputs(lambda x, gamma, beta: bn.batch_norm(x, gamma, beta, axes=axes,
                                                           epsilon=1e-3))
    second_order_modes = ['fwd', 'rev'] if layout == 'dense' else ['rev']
    check_grads(fn, (x, gamma, beta), order=2, modes=second_order_modes, atol=1e-5,
                rtol=1e-5)
    check_grads(fn, (x, gamma, beta), order=1, modes=['fwd', 'rev'], atol=1e-5, rtol=1e-5)
    # Without gamma / beta.
    fn = flat_outputs(lambda x: bn.batch_norm(x, None, None, axes=axes, epsilon=1e-3))
    check_grads(fn, (x,), order=1, modes=['fwd', 'rev'], atol=1e-5, rtol=1e-5)


def test_check_grads_batch_moments_float64():
  with jax.enable_x64(True):
    x, _, _, _ = random_inputs(14, (3, 2, 2, 3), np.float64)
    fn = flat_outputs(lambda x: bn.batch_moments(x, axes=(0, 1, 2)))
    check_grads(fn, (x,), order=2, modes=['fwd', 'rev'])


def test_jvp_matches_vjp():
  x, gamma, beta, dy = random_inputs(15, (4, 3, 3, 5))
  dx_dir = np.random.default_rng(16).normal(size=x.shape).astype(np.float32)

  def fn(x):
    return bn.batch_norm(x, gamma, beta, axes=(0, 1, 2), epsilon=EPS)[0]

  jvp_out = jax.jit(lambda x, t: jax.jvp(fn, (x,), (t,))[1])(x, dx_dir)
  (vjp_out,) = jax.jit(lambda x, ct: jax.vjp(fn, x)[1](ct))(x, dy)
  # <dy, J dx> == <J^T dy, dx>
  np.testing.assert_allclose(np.sum(jvp_out * dy), np.sum(vjp_out * dx_dir), rtol=1e-3)


# ----------------------------------------------------------------------------------
# Properties the paper states.


@pytest.mark.parametrize('layout', sorted(LAYOUTS))
def test_identity_recovery(layout):
  shape, axes = LAYOUTS[layout]
  x, _, _, _ = random_inputs(20, shape)
  x = jnp.asarray(x)
  mean, var = bn.batch_moments(x, axes=axes)
  y, _, _ = bn.batch_norm(x, jnp.sqrt(var + EPS), mean, axes=axes, epsilon=EPS)
  np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize('layout', sorted(LAYOUTS))
def test_output_has_zero_mean_unit_variance(layout):
  shape, axes = LAYOUTS[layout]
  x, _, _, _ = random_inputs(21, shape)
  with jax.enable_x64(True):
    y, _, _ = bn.batch_norm(jnp.asarray(x, jnp.float64), None, None, axes=axes,
                            epsilon=1e-12)
    np.testing.assert_allclose(np.mean(y, axis=axes), 0.0, atol=1e-12)
    np.testing.assert_allclose(np.var(y, axis=axes), 1.0, rtol=1e-9)
  # Non-trivial gamma / beta move the moments to beta and gamma^2.
  _, gamma, beta, _ = random_inputs(22, shape)
  y, _, _ = bn.batch_norm(jnp.asarray(x), gamma, beta, axes=axes, epsilon=EPS)
  y = np.asarray(y, np.float64)
  np.testing.assert_allclose(y.mean(axis=axes), beta, atol=1e-4)
  np.testing.assert_allclose(y.var(axis=axes), gamma ** 2, rtol=1e-3)


def dense_layer(u, w):
  return u @ w


def conv_layer(u, w):
  return jax.lax.conv_general_dilated(
      u, w, window_strides=(1, 1), padding='SAME',
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


LAYERS = {
    # name: (layer, input shape, kernel shape, reduction axes)
    'dense': (dense_layer, (16, 5), (5, 4), (0,)),
    'conv': (conv_layer, (3, 4, 4, 2), (3, 3, 2, 3), (0, 1, 2)),
}


def layer_inputs(seed, name):
  _, u_shape, w_shape, _ = LAYERS[name]
  rng = np.random.default_rng(seed)
  u = 1.0 + rng.normal(size=u_shape)
  w = rng.normal(size=w_shape)
  features = w_shape[-1]
  gamma = rng.uniform(0.5, 2.0, size=features)
  beta = rng.normal(size=features)
  cotangent = rng.normal(size=(u_shape[:-1] + (features,)))
  return u, w, gamma, beta, cotangent


@pytest.mark.parametrize('name', sorted(LAYERS))
@pytest.mark.parametrize('a', [0.1, 7.0])
def test_scale_invariance_of_output(name, a):
  layer, _, _, axes = LAYERS[name]
  with jax.enable_x64(True):
    u, w, gamma, beta, _ = layer_inputs(30, name)

    def bn_of(w, eps):
      return bn.batch_norm(layer(u, w), gamma, beta, axes=axes, epsilon=eps)[0]

    # Exactly: BN_eps((aW)u) = BN_{eps/a^2}(Wu); neglecting eps, BN((aW)u) = BN(Wu).
    np.testing.assert_allclose(bn_of(a * w, EPS), bn_of(w, EPS / a ** 2), rtol=1e-10,
                               atol=1e-10)
    np.testing.assert_allclose(bn_of(a * w, 1e-12), bn_of(w, 1e-12), rtol=1e-8,
                               atol=1e-8)


@pytest.mark.parametrize('name', sorted(LAYERS))
@pytest.mark.parametrize('a', [0.1, 7.0])
def test_scale_invariance_of_gradients(name, a):
  layer, _, _, axes = LAYERS[name]
  with jax.enable_x64(True):
    u, w, gamma, beta, dy = layer_inputs(31, name)

    def loss(u, w):
      y, _, _ = bn.batch_norm(layer(u, w), gamma, beta, axes=axes, epsilon=1e-12)
      return jnp.sum(y * dy)

    grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
    du_a, dw_a = grad(u, a * w)   # dw_a is d loss / d(aW)
    du_1, dw_1 = grad(u, w)
    # dBN((aW)u)/du = dBN(Wu)/du: the layer's Jacobian does not grow with its weights.
    np.testing.assert_allclose(du_a, du_1, rtol=1e-7, atol=1e-9)
    # dBN((aW)u)/d(aW) = (1/a) dBN(Wu)/dW: larger weights get smaller gradients.
    np.testing.assert_allclose(dw_a, dw_1 / a, rtol=1e-7, atol=1e-9)
    assert np.abs(np.asarray(dw_1)).max() > 1e-3   # not trivially zero


# ----------------------------------------------------------------------------------
# Degenerate inputs.


@pytest.mark.parametrize('layout', sorted(LAYOUTS))
def test_constant_channel_stays_finite(layout):
  shape, axes = LAYOUTS[layout]
  x, gamma, beta, dy = random_inputs(40, shape)
  x[..., 1] = 3.25  # zero variance in channel 1
  x = jnp.asarray(x)
  y, mean, var = bn.batch_norm(x, gamma, beta, axes=axes, epsilon=EPS)
  assert np.all(np.isfinite(y))
  # The mean of 3.25s need not round to exactly 3.25, so var is ~0, never negative.
  assert 0.0 <= float(var[1]) < 1e-10 and float(mean[1]) == pytest.approx(3.25)
  # xhat = 0, so y = beta, up to the rounding of the multiply-add form
  # x * m + (beta - mu * m), m = gamma / sqrt(eps): a few ulps of |mu * m|.
  ulps = 4 * np.finfo(np.float32).eps * abs(3.25 * gamma[1]) / np.sqrt(EPS)
  np.testing.assert_allclose(y[..., 1], beta[1], atol=ulps)
  grads = loss_grads(x, gamma, beta, jnp.asarray(dy), axes)
  for g in grads:
    assert np.all(np.isfinite(g))
  # dl/dx for the constant channel is the chain rule's value: gamma/sqrt(eps) * (dy - mean(dy)).
  dx_ref, _, _ = np_batch_norm_grads(np.asarray(x), gamma, dy, axes, EPS)
  np.testing.assert_allclose(grads[0][..., 1], dx_ref[..., 1], rtol=1e-3, atol=1e-2)
  # Second order (forward over reverse) stays finite too, on a small slice.
  small = x[:3] if layout == 'dense' else x[:1, :2, :2]
  ct = jnp.asarray(dy)[tuple(slice(0, n) for n in small.shape)]
  hessian = jax.jit(jax.jacfwd(jax.grad(lambda x: jnp.sum(
      bn.batch_norm(x, gamma, beta, axes=axes, epsilon=EPS)[0] * ct))))(small)
  assert np.all(np.isfinite(hessian))


def test_all_constant_input():
  x = jnp.full((8, 3), -2.0)
  y, mean, var = bn.batch_norm(x, jnp.ones(3), jnp.full(3, 0.5), axes=(0,), epsilon=EPS)
  np.testing.assert_array_equal(var, 0.0)
  np.testing.assert_allclose(mean, -2.0)
  np.testing.assert_allclose(y, 0.5)


# ----------------------------------------------------------------------------------
# Bad arguments.


@pytest.mark.parametrize('axes, bad', [((2,), '2'), ((0, 5), '5'), ((-3,), '-3')])
def test_axes_out_of_range_raise(axes, bad):
  x = jnp.ones((4, 3))
  with pytest.raises(ValueError, match=rf'axis {re.escape(bad)}\b'):
    bn.batch_norm(x, None, None, axes=axes, epsilon=EPS)
  with pytest.raises(ValueError, match=re.escape(bad)):
    bn.batch_moments(x, axes=axes)


def test_repeated_or_empty_axes_raise():
  with pytest.raises(ValueError, match=re.escape('(0, -2)')):
    bn.batch_norm(jnp.ones((4, 3)), None, None, axes=(0, -2), epsilon=EPS)
  with pytest.raises(ValueError, match='axes'):
    bn.batch_norm(jnp.ones((4, 3)), None, None, axes=(), epsilon=EPS)


@pytest.mark.parametrize('eps', [0.0, -1e-5])
def test_non_positive_epsilon_raises(eps):
  x = jnp.ones((4, 3))
  match = re.escape(f'epsilon={eps!r}')
  with pytest.raises(ValueError, match=match):
    bn.batch_norm(x, None, None, axes=(0,), epsilon=eps)
  with pytest.raises(ValueError, match=match):
    bn.batch_norm_inference(x, None, None, jnp.zeros(3), jnp.ones(3), epsilon=eps)
  with pytest.raises(ValueError, match=match):
    bn.fold_batch_norm(jnp.ones((2, 3)), None, None, None, jnp.zeros(3), jnp.ones(3),
                       epsilon=eps)


def test_batch_of_one_raises_in_training_mode():
  with pytest.raises(ValueError, match=re.escape('(1, 5)')):
    bn.batch_norm(jnp.ones((1, 5)), None, None, axes=(0,), epsilon=EPS)
  # Inference mode is fine with a single example.
  y = bn.batch_norm_inference(jnp.ones((1, 5)), None, None, jnp.zeros(5), jnp.ones(5),
                              epsilon=EPS)
  assert y.shape == (1, 5)
