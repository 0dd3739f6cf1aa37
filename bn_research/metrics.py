"""Classification metrics of the paper's evaluation: top-k and averaged softmax.

The paper reports top-1 and top-5 error (Section 4.2.3), of single networks and of an
ensemble whose prediction is "based on the average of class probabilities predicted
by the constituent networks", each itself averaged over multi-crop views. These are
the pure functions both the training loop's evaluation and `bn_research.evaluate` use.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def top_k_correct(scores: jax.Array, labels: jax.Array, k: int) -> jax.Array:
  """1.0 where the label is among the `k` highest-scoring classes, else 0.0.

  The label's rank is the number of classes scoring strictly higher than it, so a tie
  with the label counts in its favour (as `tf.nn.in_top_k` does); `k` at or above the
  number of classes is always correct.

  Args:
    scores: (N, C) logits or probabilities (any monotone transform gives the same).
    labels: (N,) integer labels in [0, C).
    k: how many of the highest scores count.

  Returns:
    (N,) float32.
  """
  scores = scores.astype(jnp.float32)
  own = jnp.take_along_axis(scores, labels[:, None].astype(jnp.int32), axis=-1)
  rank = jnp.sum(scores > own, axis=-1)
  return (rank < k).astype(jnp.float32)


def mean_softmax(logits: jax.Array, axis: int = 0) -> jax.Array:
  """Class probabilities averaged over `axis` (views of an image, or networks).

  Args:
    logits: e.g. (V, N, C): V views' logits.
    axis: the axis averaged over.

  Returns:
    The mean of softmax(logits) over `axis`, in float32.
  """
  return jnp.mean(jax.nn.softmax(logits.astype(jnp.float32), axis=-1), axis=axis)


def probability_metrics(probs: jax.Array, labels: jax.Array, mask: jax.Array,
                        top_k: int = 5) -> dict:
  """Masked sums over a batch of class probabilities (not logits).

  Returns:
    {'nll_sum': sum of -log p(label), 'correct': top-1 hits, 'correct_top5' (for
    top_k=5): top-k hits, 'count': examples}; padded examples (mask 0) count nowhere.
  """
  own = jnp.take_along_axis(probs, labels[:, None].astype(jnp.int32), axis=-1)[:, 0]
  # The smallest positive float32 keeps a confidently wrong view's loss finite.
  nll = -jnp.log(jnp.maximum(own, jnp.finfo(jnp.float32).tiny))
  return {'nll_sum': jnp.sum(nll * mask),
          'correct': jnp.sum(top_k_correct(probs, labels, 1) * mask),
          f'correct_top{top_k}': jnp.sum(top_k_correct(probs, labels, top_k) * mask),
          'count': jnp.sum(mask)}
