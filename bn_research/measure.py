"""Measurements of why BN helps: Santurkar et al. (2018) and the paper's own claims.

Two pure, jit-able measurements on any model, given its training loss
`loss_fn(params, batch) -> scalar`:

* `internal_covariate_shift` (their Definition 2.1): for layer i, G = the gradient of
  the loss w.r.t. layer i's parameters at step t, and G' = the same gradient after
  layers 1..i-1 have taken step t's update (same mini-batch). Reported as ||G - G'||_2
  and cos(G, G'). Layer 1 sees no earlier update, so its shift is 0 by definition.
* `loss_landscape`: along the gradient g = grad L(w), for several step sizes eta, the
  loss L(w - eta g) and its gradient; reported as the loss range (max - min over eta),
  the gradient predictiveness max_eta ||grad L(w - eta g) - g|| and the effective
  beta-smoothness max_eta ||grad L(w - eta g) - g|| / ||eta g||.

Three more look at the network itself, for the paper's claims:

* `input_jacobian` / `layer_jacobian_singular_values` (Section 3.3: "BN may lead the
  layer Jacobians to have singular values close to 1"): for one example, the Jacobian
  of the input of the next layer w.r.t. the input of this one, with BN's statistics
  those of the mini-batch held fixed (BN is then the affine map it is at inference),
  summarised by `singular_value_summary` (mean, min, max, and the spread around 1,
  mean |log s|);
* `nonlinearity_saturation` (the "saturated regime" of sigmoids, Section 3): the
  fraction of each nonlinearity's inputs with |x| > 2 and |x| > 4, and their
  histogram;
* `parameter_norms`: ||p|| of every parameter array (a pre-normalisation bias that
  drifts, Section 2).

`make_measurement(model, ...)` wraps them all for a Flax model trained with softmax
cross-entropy as the engine's train step does (BN in training mode, batch statistics
from the mini-batch), returning named scalars for `metrics.jsonl`.

A layer is a '/'-separated path prefix into the parameter tree ('dense_0',
'inception_3a/branch1x1'), or a tuple of them when a layer owns several subtrees (a
dense layer and the BN that normalises its output). Layers are listed input to output.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

Layer = Union[str, Sequence[str]]
Pytree = Any


def _prefixes(layer: Layer) -> tuple[str, ...]:
  return (layer,) if isinstance(layer, str) else tuple(layer)


def _leaf_paths(params: Pytree) -> list[str]:
  """'/'-joined key path of every leaf, in tree_flatten order."""
  paths, _ = zip(*jax.tree_util.tree_flatten_with_path(params)[0])
  return ['/'.join(str(getattr(k, 'key', getattr(k, 'name', k))) for k in path)
          for path in paths]


def layer_index_of_leaves(params: Pytree, layers: Sequence[Layer]) -> list[int]:
  """For every leaf (tree_flatten order), the index of the layer owning it, or
  len(layers) for a leaf in no layer (never replaced, never measured).

  Raises:
    ValueError: a prefix that matches no parameter, or one leaf claimed by two layers.
  """
  paths = _leaf_paths(params)
  owner = [len(layers)] * len(paths)
  for i, layer in enumerate(layers):
    for prefix in _prefixes(layer):
      hits = [j for j, p in enumerate(paths) if p == prefix or p.startswith(prefix + '/')]
      if not hits:
        raise ValueError(f'layer {prefix!r} matches no parameter; top-level names: '
                         f'{sorted({p.split("/")[0] for p in paths})}.')
      for j in hits:
        if owner[j] != len(layers):
          raise ValueError(f'parameter {paths[j]!r} is in two layers ({owner[j]} and {i}).')
        owner[j] = i
  return owner


def _per_layer_sums(values: Sequence[jax.Array], owner: Sequence[int], k: int) -> jax.Array:
  """(k,) sums of per-leaf scalars grouped by owning layer (static grouping)."""
  totals = [jnp.zeros((), jnp.float32)] * k
  for v, i in zip(values, owner):
    if i < k:
      totals[i] = totals[i] + v
  return jnp.stack(totals)


def internal_covariate_shift(loss_fn: Callable[[Pytree, Any], jax.Array], params: Pytree,
                             new_params: Pytree, layers: Sequence[Layer], batch: Any
                             ) -> dict[str, jax.Array]:
  """Santurkar et al.'s internal covariate shift of every layer at one training step.

  Args:
    loss_fn: the training loss, `loss_fn(params, batch) -> scalar`.
    params: the parameters at step t.
    new_params: the parameters after step t's update (same structure).
    layers: the layers, input to output (see the module docstring).
    batch: step t's mini-batch, passed to `loss_fn` unchanged.

  Returns:
    {'l2': (k,) ||G_i - G'_i||_2, 'cos': (k,) cos(G_i, G'_i), 'grad_norm': (k,) ||G_i||}
    for the k layers; layer 0 is exactly (0, 1).
  """
  k = len(layers)
  owner = layer_index_of_leaves(params, layers)
  owner_tree = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(params), owner)
  grad_fn = jax.grad(loss_fn)
  g = jax.tree_util.tree_leaves(grad_fn(params, batch))
  g = [x.astype(jnp.float32) for x in g]
  g_norm2 = _per_layer_sums([jnp.sum(x * x) for x in g], owner, k)

  def shifted(i):
    # Layers before i take their new values; layer i and later stay at step t. One
    # program body for every layer (a lax.map over i), not k unrolled gradients.
    mixed = jax.tree_util.tree_map(lambda o, old, new: jnp.where(o < i, new, old),
                                   owner_tree, params, new_params)
    g2 = [x.astype(jnp.float32) for x in jax.tree_util.tree_leaves(grad_fn(mixed, batch))]
    diff2 = _per_layer_sums([jnp.sum((a - b) ** 2) for a, b in zip(g, g2)], owner, k)
    dot = _per_layer_sums([jnp.sum(a * b) for a, b in zip(g, g2)], owner, k)
    norm2 = _per_layer_sums([jnp.sum(b * b) for b in g2], owner, k)
    return diff2[i], dot[i], norm2[i]

  if k > 1:
    diff2, dot, norm2 = jax.lax.map(shifted, jnp.arange(1, k))
  else:
    diff2 = dot = norm2 = jnp.zeros((0,), jnp.float32)
  l2 = jnp.concatenate([jnp.zeros((1,)), jnp.sqrt(diff2)])
  denom = jnp.sqrt(g_norm2[1:] * norm2)
  cos = jnp.concatenate([jnp.ones((1,)), jnp.where(denom > 0, dot / jnp.where(
      denom > 0, denom, 1.0), 1.0)])
  return {'l2': l2, 'cos': cos, 'grad_norm': jnp.sqrt(g_norm2)}


def _global_norm(leaves: Sequence[jax.Array]) -> jax.Array:
  return jnp.sqrt(sum(jnp.sum(x.astype(jnp.float32) ** 2) for x in leaves))


def loss_landscape(loss_fn: Callable[[Pytree, Any], jax.Array], params: Pytree, batch: Any,
                   etas: Union[Sequence[float], jax.Array]) -> dict[str, jax.Array]:
  """The loss and its gradient along the gradient direction, at several step sizes.

  Args:
    loss_fn: the training loss, `loss_fn(params, batch) -> scalar`.
    params: the point w the steps start from.
    batch: the mini-batch both the direction and the losses are computed on.
    etas: step sizes (> 0); all of them are evaluated in one vmapped program.

  Returns:
    Per step size: 'loss' L(w - eta g), 'grad_distance' ||grad L(w - eta g) - g||.
    Scalars: 'loss_range' (max - min of 'loss'), 'grad_predictiveness' (max of
    'grad_distance'), 'beta_smoothness' (max of grad_distance / ||eta g||), and
    'loss_at_w', 'grad_norm' at w itself.
  """
  etas = jnp.asarray(etas, jnp.float32)
  loss0, g = jax.value_and_grad(loss_fn)(params, batch)
  g_leaves = jax.tree_util.tree_leaves(g)
  g_norm = _global_norm(g_leaves)

  def along(eta):
    moved = jax.tree_util.tree_map(lambda p, d: p - (eta * d).astype(p.dtype), params, g)
    loss, g_eta = jax.value_and_grad(loss_fn)(moved, batch)
    dist = _global_norm([a.astype(jnp.float32) - b.astype(jnp.float32)
                         for a, b in zip(jax.tree_util.tree_leaves(g_eta), g_leaves)])
    return loss, dist

  losses, dists = jax.vmap(along)(etas)
  moved_by = etas * g_norm
  beta = jnp.max(jnp.where(moved_by > 0, dists / jnp.where(moved_by > 0, moved_by, 1.0), 0.0))
  return {'loss': losses, 'grad_distance': dists,
          'loss_range': jnp.max(losses) - jnp.min(losses),
          'grad_predictiveness': jnp.max(dists), 'beta_smoothness': beta,
          'loss_at_w': loss0, 'grad_norm': g_norm}


# ---- the engine's view: a Flax model trained with softmax cross-entropy ---------------

_NORMALIZER_NAME = re.compile(r'(\w+_)?(bn|batch_norm)(_\d+)?$')
_MLP_DENSE = re.compile(r'dense_(\d+)$')


def creation_order(model: nn.Module, sample_image: Any) -> list[str]:
  """The model's top-level parameter names in the order it creates them (input to
  output for a feed-forward net). Read while tracing `init` (no compute): JAX rebuilds
  dicts with sorted keys, so the order is not recoverable from a params tree that has
  passed through jit or eval_shape."""
  order: list[str] = []

  def init(x):
    params = model.init(jax.random.key(0), x, train=False)['params']
    order.extend(params)
    return params

  jax.eval_shape(init, jax.ShapeDtypeStruct(jnp.shape(sample_image), jnp.float32))
  return order


def model_layers(names: Sequence[str]) -> list[tuple[str, tuple[str, ...]]]:
  """(name, prefixes) of a model's layers, input to output, from its top-level names.

  Each top-level parameter subtree is a layer, in creation order (`creation_order`); a
  normaliser's subtree ('bn_0', 'conv_bn_1') joins the layer before it, whose output it
  normalises. The MLP's 'dense_i' layers are named 'hidden_i', as its intermediates
  are. For BN-Inception each stem unit and each inception module is one layer.
  """
  out: list[tuple[str, list[str]]] = []
  for key in names:
    if _NORMALIZER_NAME.match(key) and out:
      out[-1][1].append(key)
      continue
    m = _MLP_DENSE.match(key)
    out.append((f'hidden_{m.group(1)}' if m else key, [key]))
  return [(name, tuple(prefixes)) for name, prefixes in out]


def training_loss(model: nn.Module, *, rng_streams: Sequence[str] = ('dropout',)
                  ) -> Callable[..., jax.Array]:
  """`loss(params, batch_stats, batch, rng)`: softmax cross-entropy with the model in
  training mode, as the train step computes it (BN normalises with the mini-batch's
  statistics; the moving averages it would update are discarded)."""

  def loss(params, batch_stats, batch, rng):
    variables = {'params': params}
    if batch_stats:
      variables['batch_stats'] = batch_stats
    logits, _ = model.apply(variables, batch['image'], train=True, mutable=['batch_stats'],
                            rngs={s: rng for s in rng_streams})
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), batch['label']))

  return loss


def make_measurement(model: nn.Module, sample_image: Any = None, *, etas: Sequence[float] = (),
                     ics: bool = True, landscape: bool = True, jacobian: bool = False,
                     saturation: bool = False, param_norms: bool = False,
                     jacobian_examples: int = 8,
                     layers: Sequence[tuple[str, Layer]] | None = None,
                     rng_streams: Sequence[str] = ('dropout',)) -> Callable[..., dict]:
  """The periodic measurement the engine runs at a training step t.

  Args:
    model: the Flax model (`apply(variables, images, train=...)`).
    sample_image: an input batch, to read the model's layer order (not needed when
      `layers` is given, e.g. inside a traced function that builds the model).
    etas: the landscape's step sizes (needed when `landscape`).
    ics: measure internal covariate shift.
    landscape: measure the loss landscape along the gradient.
    layers: (name, layer) pairs; default `model_layers(creation_order(...))`.
    rng_streams: the model's random streams in training (dropout, noise), all fed
      from the measurement's `rng`.

    jacobian: measure the singular values of each layer's Jacobian (layer i's input ->
      layer i+1's input, `layers` in order; the last layer has no next and is skipped).
    saturation: measure the nonlinearities' inputs (the model's sown `hidden_*`
      intermediates) on the mini-batch, in training mode.
    param_norms: the norm of every parameter array.
    jacobian_examples: examples of the mini-batch whose Jacobians are taken (the first
      ones).

  Returns:
    `measure(params, new_params, batch_stats, batch, rng) -> dict of scalars`, jit-able:
    params before and after step t's update, the batch statistics the step started
    from, step t's mini-batch and its rng. Keys: 'ics_l2/<layer>', 'ics_cos/<layer>',
    'ics_rel/<layer>' (||G - G'|| / ||G||);
    'landscape_loss_range' (with 'landscape_loss_min', '..._max'), 'landscape_grad_pred'
    (the max over step sizes, with 'landscape_grad_pred_min'), 'landscape_beta'.
  """
  if landscape and not len(etas):
    raise ValueError('make_measurement: landscape=True needs at least one step size eta.')
  loss = training_loss(model, rng_streams=rng_streams)
  if (ics or jacobian) and layers is None:
    if sample_image is None:
      raise ValueError('make_measurement: ics=True or jacobian=True needs layers or a '
                       'sample_image.')
    layers = model_layers(creation_order(model, sample_image))

  def measure(params, new_params, batch_stats, batch, rng):
    loss_fn = lambda p, b: loss(p, batch_stats, b, rng)
    out = {}
    if ics:
      shift = internal_covariate_shift(loss_fn, params, new_params,
                                       [layer for _, layer in layers], batch)
      for i, (name, _) in enumerate(layers):
        out[f'ics_l2/{name}'] = shift['l2'][i]
        out[f'ics_cos/{name}'] = shift['cos'][i]
        # Relative to ||G||: comparable between networks whose gradients differ in
        # scale (a network stuck on a plateau has small gradients and small ||G - G'||).
        out[f'ics_rel/{name}'] = shift['l2'][i] / jnp.maximum(shift['grad_norm'][i], 1e-30)
    if landscape:
      land = loss_landscape(loss_fn, params, batch, etas)
      # Min and max too: Santurkar et al. draw the loss and the gradient change over
      # the step sizes as bands over training.
      out.update(landscape_loss_range=land['loss_range'],
                 landscape_loss_min=jnp.min(land['loss']),
                 landscape_loss_max=jnp.max(land['loss']),
                 landscape_grad_pred=land['grad_predictiveness'],
                 landscape_grad_pred_min=jnp.min(land['grad_distance']),
                 landscape_beta=land['beta_smoothness'])
    if jacobian or saturation:
      variables = {'params': params}
      if batch_stats:
        variables['batch_stats'] = batch_stats
      _, state = model.apply(variables, batch['image'], train=True,
                             mutable=['batch_stats', 'batch_moments', 'intermediates'],
                             rngs={s: rng for s in rng_streams})
      if saturation:
        out.update(nonlinearity_saturation(
            {k: v[0] for k, v in state['intermediates'].items()}))
      if jacobian:
        fixed = {'params': params}
        if batch_stats:
          fixed['batch_stats'] = batch_statistics(batch_stats, state['batch_moments'])
        images = batch['image'][:jacobian_examples]
        for (name, layer), (_, following) in zip(layers, layers[1:]):
          sv = layer_jacobian_singular_values(model, fixed, images, _prefixes(layer)[0],
                                              _prefixes(following)[0])
          for key, value in singular_value_summary(sv).items():
            out[f'jacobian_sv_{key}/{name}'] = value
    if param_norms:
      out.update(parameter_norms(params))
    return out

  return measure


# ---- the network itself: Jacobians (Section 3.3), saturation, parameter norms ----------

# Bins of `saturation`'s histogram of nonlinearity inputs: width 1 on [-8, 8]; the end
# bins also count everything beyond them, so the fractions sum to 1.
HIST_EDGES = tuple(float(e) for e in range(-8, 9))
SATURATION_THRESHOLDS = (2.0, 4.0)


def singular_value_summary(s: jax.Array) -> dict[str, jax.Array]:
  """mean, min, max and the spread around 1 (mean |log s|) of singular values.

  mean |log s| is 0 only when every singular value is 1 (the paper's Section 3.3
  ideal, where the layer preserves the scale of every direction) and counts a
  factor c too large and a factor c too small alike.
  """
  s = jnp.ravel(s).astype(jnp.float32)
  return {'mean': jnp.mean(s), 'min': jnp.min(s), 'max': jnp.max(s),
          'log_spread': jnp.mean(jnp.abs(jnp.log(jnp.maximum(s, 1e-30))))}


def _apply_intercepted(model: nn.Module, variables: Any, images: jax.Array, first: str,
                       second: str, delta: Any = None) -> tuple[jax.Array, jax.Array]:
  """Runs the model in inference mode; returns the inputs of the modules named `first`
  and `second` (top-level names), `delta` added to the input of `first`."""
  seen: dict[str, jax.Array] = {}

  def interceptor(next_fun, args, kwargs, context):
    name = context.module.name
    if context.method_name == '__call__' and name in (first, second) and name not in seen:
      if name == first and delta is not None:
        args = (args[0] + delta,) + tuple(args[1:])
      seen[name] = args[0]
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    model.apply(variables, images, train=False)
  for name in (first, second):
    if name not in seen:
      raise ValueError(f'no module named {name!r} was called by {type(model).__name__}.')
  return seen[first], seen[second]


def input_jacobian(model: nn.Module, variables: Any, image: jax.Array, first: str,
                   second: str) -> jax.Array:
  """(out, in) Jacobian, for one example, of the input of module `second` w.r.t. the
  input of module `first`, the model applied in inference mode with `variables`.

  Args:
    model: a Flax model whose layers are top-level submodules (`first`, `second`:
      their names, e.g. 'dense_0' and 'dense_1' of the MLP).
    variables: its variables; give BN the mini-batch's statistics as `batch_stats`
      (`batch_statistics`) for the Jacobian of the training-mode layer with the
      statistics held fixed.
    image: one example, without a batch axis.
  """
  x = image[None]
  shape = jax.eval_shape(lambda: _apply_intercepted(model, variables, x, first, second)[0])

  def next_input(delta):
    return _apply_intercepted(model, variables, x, first, second, delta)[1][0]

  jac = jax.jacfwd(next_input)(jnp.zeros(shape.shape, shape.dtype))
  return jac.reshape(jac.shape[0], -1)


def layer_jacobian_singular_values(model: nn.Module, variables: Any, images: jax.Array,
                                   first: str, second: str) -> jax.Array:
  """(n, min(out, in)) singular values of `input_jacobian` for each of n examples."""
  jacobians = jax.vmap(
      lambda im: input_jacobian(model, variables, im, first, second))(images)
  return jnp.linalg.svd(jacobians.astype(jnp.float32), compute_uv=False)


def batch_statistics(batch_stats: Any, moments: Any) -> Any:
  """`batch_stats` with every BN layer's mean and var replaced by the mini-batch's
  own (biased) mu_B and var_B from the `batch_moments` collection, so that inference
  mode normalises exactly as training mode did on that batch."""
  if isinstance(moments, Mapping) and 'moments' in moments:
    m = moments['moments']
    m = m[0] if isinstance(m, tuple) else m
    return {**batch_stats, 'mean': m['mean'], 'var': m['var']}
  return {k: batch_statistics(v, moments[k]) if k in moments else v
          for k, v in batch_stats.items()}


def nonlinearity_saturation(pre_activations: Mapping[str, jax.Array]
                            ) -> dict[str, jax.Array]:
  """Per layer: the fraction of nonlinearity inputs with |x| > 2 and > 4 (where the
  sigmoid's derivative is below 0.105 and 0.018, against 0.25 at 0), and their
  histogram over `HIST_EDGES`.

  Args:
    pre_activations: {layer name: inputs of that layer's nonlinearity, any shape}.

  Returns:
    'saturation_2/<layer>', 'saturation_4/<layer>' and 'input_hist/<layer>/<lower
    edge>' (fractions; the end bins count the tails too).
  """
  out = {}
  edges = jnp.asarray(HIST_EDGES, jnp.float32)
  for name, x in sorted(pre_activations.items()):
    x = jnp.ravel(x).astype(jnp.float32)
    for t in SATURATION_THRESHOLDS:
      out[f'saturation_{t:g}/{name}'] = jnp.mean(jnp.abs(x) > t)
    # The bin of each value: how many inner edges it reaches (values below the first
    # edge land in the first bin, beyond the last in the last). Comparisons, not
    # jnp.searchsorted, which fails inside the members' shard_map (jax 0.10.2).
    index = jnp.sum(x[:, None] >= edges[None, 1:-1], axis=1)
    counts = jnp.mean(index[:, None] == jnp.arange(len(HIST_EDGES) - 1)[None], axis=0)
    for lo, c in zip(HIST_EDGES, counts):
      out[f'input_hist/{name}/{lo:g}'] = c
  return out


def parameter_norms(params: Pytree) -> dict[str, jax.Array]:
  """'param_norm/<path>': the L2 norm of every parameter array ('dense_0/kernel')."""
  leaves = jax.tree_util.tree_leaves(params)
  return {f'param_norm/{path}': jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32))))
          for path, x in zip(_leaf_paths(params), leaves)}
