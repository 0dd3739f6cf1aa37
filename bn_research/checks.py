"""Typed, range-checked config values: one declaration per key, next to its owner.

Each module that reads config keys declares them as a dict `{dotted key: spec}`
(`config.CORE_KEYS`, `models.model_keys()`, `data.DATA_KEYS`, `imagenet.IMAGENET_KEYS`).
`config.validate_config` checks every key a config holds against its spec before
anything is loaded, compiled or written, and the property test in
tests/test_validation.py feeds every key the values its spec says are bad
(`Spec.bad_values`), so a key added with a spec is tested without writing a test.

Every error is one line: the key, the value given and what is allowed.
Light (no JAX, no NumPy) so that the config and data modules can share it.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Mapping, Optional, Sequence

# Seeds feed np.random.default_rng and jax.random.PRNGKey (which takes an int32 or a
# uint32 depending on the x64 flag); [0, 2**31) is what both accept everywhere.
SEED_LIMIT = 2**31


def is_int(value: Any) -> bool:
  """An integer that is not a bool (True is an int in Python, never a count here)."""
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value: Any) -> bool:
  """A real number that is not a bool (ints are accepted where a float is asked)."""
  return isinstance(value, numbers.Real) and not isinstance(value, bool)


def fail(key: str, value: Any, allowed: str) -> ValueError:
  """The one-line error for `key=value`; `allowed` says what would be accepted."""
  return ValueError(f'{key}={value!r} is invalid: must be {allowed}.')


class Spec:
  """What a key accepts. Subclasses: Int, Float, Bool, Choice, Text, Ints, Floats, Range."""

  def check(self, key: str, value: Any) -> None:
    """Raises the one-line ValueError unless `value` is allowed for `key`."""
    raise NotImplementedError

  def bad_values(self) -> Sequence[Any]:
    """Values this spec must refuse (for the property test)."""
    raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class Int(Spec):
  """An int (not a bool) in [low, high]; None: unbounded on that side."""
  low: Optional[int] = 0
  high: Optional[int] = None
  note: str = ''

  def allowed(self) -> str:
    if self.low is None and self.high is None:
      text = 'an integer'
    elif self.high is None:
      text = f'an integer >= {self.low}'
    elif self.low is None:
      text = f'an integer <= {self.high}'
    else:
      text = f'an integer in [{self.low}, {self.high}]'
    return text + (f' ({self.note})' if self.note else '')

  def check(self, key, value):
    if (not is_int(value) or (self.low is not None and value < self.low)
        or (self.high is not None and value > self.high)):
      raise fail(key, value, self.allowed())

  def bad_values(self):
    bad = [1.5, '1', True, None]
    if self.low is not None:
      bad.append(self.low - 1)
    if self.high is not None:
      bad.append(self.high + 1)
    return bad


@dataclasses.dataclass(frozen=True)
class Float(Spec):
  """A finite real (not a bool) between `low` and `high`; open ends where asked."""
  low: float = -math.inf
  high: float = math.inf
  low_open: bool = False
  high_open: bool = False
  note: str = ''

  def allowed(self) -> str:
    if self.high == math.inf and self.low != -math.inf:
      text = f'a finite number {">" if self.low_open else ">="} {self.low:g}'
    elif self.low == -math.inf:
      text = f'a finite number {"<" if self.high_open else "<="} {self.high:g}'
    else:
      text = (f'a number in {"(" if self.low_open else "["}{self.low:g}, {self.high:g}'
              f'{")" if self.high_open else "]"}')
    return text + (f' ({self.note})' if self.note else '')

  def check(self, key, value):
    ok = is_real(value) and math.isfinite(value)
    if ok:
      ok = (value > self.low if self.low_open else value >= self.low) and (
          value < self.high if self.high_open else value <= self.high)
    if not ok:
      raise fail(key, value, self.allowed())

  def bad_values(self):
    bad = [math.nan, math.inf, -math.inf, '0.5', True, None]
    if self.low != -math.inf:
      bad.append(self.low if self.low_open else self.low - 1)
    if self.high != math.inf:
      bad.append(self.high if self.high_open else self.high + 1)
    return bad


@dataclasses.dataclass(frozen=True)
class Bool(Spec):
  """True or False (NumPy bools too); 1, 'true' are refused: a typo, not a flag."""

  def check(self, key, value):
    if not (isinstance(value, bool) or type(value).__name__ == 'bool_'):
      raise fail(key, value, 'True or False')

  def bad_values(self):
    return [1, 0, 'True', None]


@dataclasses.dataclass(frozen=True)
class Choice(Spec):
  """One of a fixed set of strings."""
  options: tuple

  def check(self, key, value):
    if not isinstance(value, str) or value not in self.options:
      raise fail(key, value, 'one of ' + ', '.join(map(repr, self.options)))

  def bad_values(self):
    return ['no_such_option', '', 1, None]


@dataclasses.dataclass(frozen=True)
class Text(Spec):
  """Any str; `nonempty` refuses ''. Whatever else the text must be, its owner checks."""
  nonempty: bool = False
  note: str = ''

  def check(self, key, value):
    if not isinstance(value, str) or (self.nonempty and not value):
      what = 'a non-empty string' if self.nonempty else 'a string'
      raise fail(key, value, what + (f' ({self.note})' if self.note else ''))

  def bad_values(self):
    return [1, None, ['a']] + ([''] if self.nonempty else [])


@dataclasses.dataclass(frozen=True)
class Ints(Spec):
  """A non-empty tuple or list of ints, each >= `low`."""
  low: int = 1
  note: str = ''

  def check(self, key, value):
    if (not isinstance(value, (tuple, list)) or not value
        or not all(is_int(v) and v >= self.low for v in value)):
      raise fail(key, value, f'a non-empty tuple of integers >= {self.low}'
                 + (f' ({self.note})' if self.note else ''))

  def bad_values(self):
    return [(), (self.low - 1,), (1.5,), (True,), '100', 100, None]


@dataclasses.dataclass(frozen=True)
class Floats(Spec):
  """A non-empty tuple or list of finite numbers in [low, high] ((low, high] if low_open)."""
  low: float = -math.inf
  high: float = math.inf
  low_open: bool = False
  note: str = ''

  def check(self, key, value):
    def ok(v):
      return (is_real(v) and math.isfinite(v) and v <= self.high
              and (v > self.low if self.low_open else v >= self.low))
    if not isinstance(value, (tuple, list)) or not value or not all(map(ok, value)):
      raise fail(key, value, f'a non-empty tuple of numbers in {"(" if self.low_open else "["}'
                 f'{self.low:g}, {self.high:g}]' + (f' ({self.note})' if self.note else ''))

  def bad_values(self):
    bad = [(), (math.nan,), (math.inf,), ('50',), (True,), '15,50', 50.0, None]
    if self.low != -math.inf:
      bad.append((self.low,) if self.low_open else (self.low - 1,))
    if self.high != math.inf:
      bad.append((self.high + 1,))
    return bad


@dataclasses.dataclass(frozen=True)
class Range(Spec):
  """A pair (lo, hi) of finite numbers with low < lo <= hi <= high."""
  low: float = 0.0
  high: float = math.inf

  def check(self, key, value):
    ok = (isinstance(value, (tuple, list)) and len(value) == 2
          and all(is_real(v) and math.isfinite(v) for v in value))
    if not ok or not self.low < value[0] <= value[1] <= self.high:
      raise fail(key, value, f'a pair (lo, hi) with {self.low:g} < lo <= hi <= {self.high:g}')

  def bad_values(self):
    bad = [(0.5, 0.25), (self.low, 0.5), (math.nan, 0.5), (0.5, math.inf), (0.5,), '0.1,0.5',
           0.5, None]
    if self.high != math.inf:
      bad.append((0.5, self.high + 1))
    return bad


def check_keys(tree: Any, specs: Mapping[str, Spec], prefix: str = '') -> None:
  """Checks each value of `tree` whose dotted key has a spec; the rest is the owner's job.

  Args:
    tree: a ConfigDict or nested dict (e.g. the `data` block, with prefix 'data.').
    specs: {dotted key: Spec}.
    prefix: the dotted path of `tree` inside the whole config.
  """
  for key, value in flat_keys(tree, prefix).items():
    spec = specs.get(key)
    if spec is not None:
      spec.check(key, value)


def flat_keys(tree: Any, prefix: str = '') -> dict:
  """{'dotted.key': value} of a ConfigDict or nested dict, values as stored (not the
  JSON form: a tuple stays a tuple, nan stays nan)."""
  from bn_research import rundir  # pylint: disable=g-import-not-at-top
  return rundir.flatten(tree.to_dict() if hasattr(tree, 'to_dict') else dict(tree), prefix)
