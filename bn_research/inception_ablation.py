"""The paper's Section 4.2 models as changes to one base config.

Each model is the Inception recipe plus some of the 4.2.1 "accelerating BN networks"
changes. `apply_model` sets exactly those changes, scaled from a base recipe so the same
table serves the full ImageNet configs and the small offline preset.

| model          | BN | lr   | dropout | L2   | lr decay | LRN | shuffle  | distortions | act     |
|----------------|----|------|---------|------|----------|-----|----------|-------------|---------|
| inception      | no | 1x   | yes     | 1x   | 1x       | yes | shard    | full        | relu    |
| bn_baseline    | ✓  | 1x   | yes     | 1x   | 1x       | yes | shard    | full        | relu    |
| bn_x5          | ✓  | 5x   | no      | 1/5  | 6x faster| no  | thorough | reduced     | relu    |
| bn_x30         | ✓  | 30x  | no      | 1/5  | 6x faster| no  | thorough | reduced     | relu    |
| bn_x5_sigmoid  | ✓  | 5x   | no      | 1/5  | 6x faster| no  | thorough | reduced     | sigmoid |
| inception_x5   | no | 5x   | yes     | 1x   | 1x       | yes | shard    | full        | relu    |
| inception_sigmoid | no | 5x | no     | 1/5  | 6x faster| no  | thorough | reduced     | sigmoid |

`inception_x5` is the paper's report that Inception at BN-x5's rate reaches "machine
infinity"; `inception_sigmoid` that Inception with sigmoids but no BN stays at chance
(we give it BN-x5-Sigmoid's recipe minus BN, the closest reading of the text).
"""

from __future__ import annotations

import ml_collections

MODELS = ('inception', 'bn_baseline', 'bn_x5', 'bn_x30', 'bn_x5_sigmoid',
          'inception_x5', 'inception_sigmoid')

# (uses_bn, lr multiple, accelerated recipe of 4.2.1, activation)
_TABLE = {
    'inception': (False, 1, False, 'relu'),
    'bn_baseline': (True, 1, False, 'relu'),
    'bn_x5': (True, 5, True, 'relu'),
    'bn_x30': (True, 30, True, 'relu'),
    'bn_x5_sigmoid': (True, 5, True, 'sigmoid'),
    'inception_x5': (False, 5, False, 'relu'),
    'inception_sigmoid': (False, 5, True, 'sigmoid'),
}


def apply_model(c: ml_collections.ConfigDict, model: str, *, base_learning_rate: float,
                base_weight_decay: float, base_decay_steps: int,
                base_dropout: float) -> ml_collections.ConfigDict:
  """Sets the model's normalizer, learning rate and 4.2.1 changes on config `c`."""
  if model not in _TABLE:
    raise ValueError(f'model={model!r}; allowed: {", ".join(MODELS)}.')
  uses_bn, lr_multiple, accelerated, activation = _TABLE[model]
  c.model.normalizer = 'batch_norm' if uses_bn else 'none'
  c.model.activation = activation
  c.optimizer.learning_rate = base_learning_rate * lr_multiple
  # 4.2.1: remove dropout; reduce L2 5x; decay the learning rate 6x faster; remove
  # LRN; shuffle more thoroughly; reduce photometric distortions.
  c.model.dropout_rate = 0.0 if accelerated else base_dropout
  c.optimizer.weight_decay = base_weight_decay / 5 if accelerated else base_weight_decay
  c.optimizer.decay_steps = max(1, round(base_decay_steps / 6)) if accelerated else base_decay_steps
  c.model.use_lrn = not accelerated
  c.data.shuffle = 'thorough' if accelerated else 'within_shard'
  c.data.distortions = 'reduced' if accelerated else 'full'
  return c


def parse_args(arg: str, allowed: dict) -> dict:
  """Parses 'model=bn_x30,steps=1000' (a bare first word is the model)."""
  out = {}
  for i, part in enumerate(p for p in (arg or '').split(',') if p):
    key, eq, value = part.partition('=')
    if not eq and i == 0:
      key, value = 'model', key
    if key not in allowed:
      raise ValueError(f'unknown config argument {key!r}; allowed: {", ".join(allowed)}.')
    out[key] = allowed[key](value)
  return out
