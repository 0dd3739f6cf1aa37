"""Batch Normalization as in Ioffe & Szegedy (2015): Algorithms 1 and 2.

The math lives in pure functions (`batch_norm`, `batch_norm_inference`,
`population_statistics`, `fold_batch_norm`); `BatchNorm` is a thin Flax module that
owns the learned `scale` (gamma) and `bias` (beta) in `params` and the moving averages
in the `batch_stats` collection, and calls those functions.

The normalizers BN is compared with follow the same pattern, each selectable by name
through `get_normalizer` (`NORMALIZERS`):

* `batch_renorm` (Ioffe 2017): `batch_renorm` / `BatchRenorm`, BN corrected towards
  the moving averages by r and d, clipped to limits that a `RenormSchedule` relaxes
  over training (the module counts its training steps in `batch_stats`);
* `layer_norm`, `group_norm` (Wu & He 2018): `layer_norm`, `group_norm` /
  `LayerNorm`, `GroupNorm`, statistics per example, the same in training and inference;
* `noisy_batch_norm` (Santurkar et al. 2018): `noisy_affine` / `NoisyBatchNorm`, BN
  followed by a random per-unit affine distortion drawn afresh every training step;
* `stop_gradient_batch_norm` (the paper's Section 2 counter-example):
  `batch_norm_stop_gradient` / `StopGradientBatchNorm`, BN's forward pass with mu_B and
  var_B treated as constants by the gradient.

Conventions
-----------
* Features are on the last axis. Dense activations `(batch, features)` reduce over
  `axes=(0,)`; NHWC convolution activations reduce over `axes=(0, 1, 2)`, so the
  effective mini-batch per channel is m' = m * p * q, as in the paper's Section 3.2.
* `momentum` follows Flax/TF: `new = momentum * old + (1 - momentum) * batch_value`.
  PyTorch's `momentum` is the weight of the *new* value: `torch_momentum = 1 - momentum`
  (PyTorch's default 0.1 is our 0.9). TF-slim's `decay` is our `momentum` unchanged
  (slim's inception_v2 arg scope uses decay 0.9997).
* Moving variances average the *unbiased* batch variance m/(m-1) * var_B by default
  (`unbiased_running_var=True`), because that is what Algorithm 2 estimates
  (Var[x] = m/(m-1) E_B[var_B]) and what PyTorch tracks; Flax's `nn.BatchNorm` averages
  the biased variance. The difference is a factor m/(m-1): 1.017 for the MNIST batch of
  60, negligible for convolutions where m' = m*p*q is large.

Layout
------
* `functional`: Algorithms 1 and 2 as pure functions (`batch_norm`, its closed-form
  backward, `batch_norm_inference`, `population_statistics`, `fold_batch_norm`);
* `others`: the other normalizers' functions (`batch_renorm`, `group_norm`,
  `layer_norm`, `noisy_affine`) and `RenormSchedule`;
* `modules`: the Flax modules and `get_normalizer`;
* `names`: `NORMALIZERS`, `MOVING_AVERAGE_NORMALIZERS` (no JAX).

Every public name of those modules is an attribute of this package
(`normalization.batch_norm`, `normalization.BatchNorm`). Only `names` is imported with
the package; the rest on first use, so that validating a config (which lists the
normalizers' names) does not import JAX and Flax.
"""

from __future__ import annotations

import importlib
from typing import Any

from bn_research.normalization.names import MOVING_AVERAGE_NORMALIZERS, NORMALIZERS

# The modules whose names this package re-exports, looked up in this order.
_SUBMODULES = ('functional', 'others', 'modules')


def __getattr__(name: str) -> Any:
  """`normalization.<name>` for the names of the submodules, importing them on first use."""
  if name.startswith('__'):
    raise AttributeError(name)
  for sub in _SUBMODULES:
    module = importlib.import_module(f'{__name__}.{sub}')
    if hasattr(module, name):
      value = getattr(module, name)
      globals()[name] = value
      return value
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def __dir__() -> list:
  names = set(globals())
  for sub in _SUBMODULES:
    names.update(dir(importlib.import_module(f'{__name__}.{sub}')))
  return sorted(names)
