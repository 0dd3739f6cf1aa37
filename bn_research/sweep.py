"""Hyperparameter sweeps: grids from text, run names, sweep.json, and `sweep()`.

A sweep is an ordered mapping from dotted config keys to lists of values.
Its grid is the Cartesian product, with the first key varying slowest. Every
grid point becomes one training run in its own sub-directory whose name is
built from the point's values only, so the same command always maps a point
to the same directory: re-running a sweep finds earlier runs, skips finished
ones and relaunches the rest (the engine resumes those from checkpoints).

This module is the library behind `scripts/sweep.py`: it turns the command line's
text into typed values once, builds the plan (`plan.grid`, which validates every value)
and runs it with one of `plan.run_plan`'s backends.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import logging
import math
import pathlib
import re
import sys
from typing import Any, Callable, Iterable, Mapping, Sequence

from bn_research import launch
from bn_research import plan as plan_lib
from bn_research import rundir

Sweep = dict[str, list[Any]]

_KEY_RE = re.compile(r'^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$')
# Characters kept verbatim in directory names. ',' and '=' separate the parts
# of a name, so a value containing them is hashed instead.
_SAFE_VALUE_RE = re.compile(r'^[A-Za-z0-9._+-]+$')
# Well under the usual 255-byte limit on one path component.
_MAX_NAME_LEN = 200
# `--config.key=v`, `--config.key v`, `--config.flag` and `--noconfig.flag`,
# with one or two dashes, as ml_collections' config flag accepts them.
_OVERRIDE_RE = re.compile(r'^--?(no)?config\.([^=]+)(=.*)?$', re.DOTALL)


SweepError = plan_lib.SweepError
format_value = plan_lib.format_value


# ---------------------------------------------------------------- values


def parse_value(text: str) -> Any:
  """One value as written after `KEY=`, parsed as ml_collections parses a literal
  override: Python literals (ints, floats, bools, None, tuples, lists) are evaluated,
  absl's lower-case `true`/`false` are bools, anything else is a string."""
  text = text.strip()
  if text in ('true', 'false'):
    return text == 'true'
  try:
    return ast.literal_eval(text)
  except (SyntaxError, ValueError, TypeError, MemoryError, RecursionError):
    pass
  if text.lower().lstrip('+-') in ('inf', 'infinity', 'nan'):
    return float(text)  # so that the key's spec, not a type error, names the value
  return text


def split_values(text: str) -> list[str]:
  """The unparsed value texts of `V1,V2,...` (a --sweep argument after `KEY=`), split
  at commas outside brackets and quotes, so that tuple-valued fields can be swept, e.g.
  `model.hidden_sizes=(100,100),(50,50)`; SweepError if brackets or quotes are
  unbalanced."""
  parts, current, stack, quote = [], [], [], None
  closing = {')': '(', ']': '[', '}': '{'}
  for ch in text:
    if quote:
      if ch == quote:
        quote = None
    elif ch in '\'"':
      quote = ch
    elif ch in '([{':
      stack.append(ch)
    elif ch in ')]}':
      if not stack or stack.pop() != closing[ch]:
        raise SweepError(f'unbalanced {ch!r} in sweep values {text!r}')
    elif ch == ',' and not stack:
      parts.append(''.join(current))
      current = []
      continue
    current.append(ch)
  if quote or stack:
    raise SweepError(f'unclosed {quote or stack[-1]!r} in sweep values {text!r}')
  parts.append(''.join(current))
  return parts


def _check_key(key: str, where: str) -> None:
  if not _KEY_RE.match(key):
    raise SweepError(
        f'{where}: {key!r} is not a dotted config key like '
        '"optimizer.learning_rate"')


def _canonical_text(value: Any) -> str:
  """A value's text with numbers compared as numbers: 1, 1.0 and 1e0 are all '1'.

  The engine parses an override with the config field's type, so these are one
  setting and must be one run directory.
  """
  if (isinstance(value, float) and math.isfinite(value) and value == int(value)
      and abs(value) < 1e15):
    return str(int(value))
  return format_value(value)


def _check_distinct(key: str, values: Sequence[Any], where: str) -> None:
  """Two equal values would launch the same run twice into one directory."""
  seen: dict[str, Any] = {}
  for value in values:
    text = _canonical_text(value)
    if text in seen:
      same = '' if seen[text] == value and type(seen[text]) is type(value) else (
          f' (equal to {seen[text]!r})')
      raise SweepError(f'{where}: value {value!r} of {key!r} is listed twice{same}')
    seen[text] = value


def parse_sweep_arg(arg: str) -> tuple[str, list[Any]]:
  """(key, parsed values) of one `--sweep=KEY=V1,V2,...` argument; SweepError naming
  the argument and the offending part."""
  where = f'--sweep={arg}'
  if '=' not in arg:
    raise SweepError(f'{where}: expected KEY=V1,V2,... (no "=" found)')
  key, _, text = arg.partition('=')
  key = key.strip()
  _check_key(key, where)
  try:
    texts = split_values(text)
  except SweepError as e:
    raise SweepError(f'{where}: {e}') from None
  values = []
  for i, value_text in enumerate(texts, 1):
    if not value_text.strip():
      raise SweepError(f'{where}: value #{i} of {key!r} is empty')
    values.append(parse_value(value_text))
  _check_distinct(key, values, where)
  return key, values


def check_sweep(sweep: Any, where: str) -> Sweep:
  """A sweep defined in Python (an experiments/ file), checked: a mapping from dotted
  keys to non-empty lists of values, returned as a fresh dict of lists; SweepError
  naming `where` and the key or value at fault."""
  if not isinstance(sweep, Mapping):
    raise SweepError(f'{where}: SWEEP must be a dict, got {type(sweep).__name__}')
  out: Sweep = {}
  for key, values in sweep.items():
    if not isinstance(key, str):
      raise SweepError(f'{where}: key {key!r} is not a string')
    _check_key(key, where)
    # A bare string would otherwise be swept character by character.
    if not isinstance(values, (list, tuple)) or not values:
      raise SweepError(
          f'{where}: values of {key!r} must be a non-empty list, got {values!r}')
    for value in values:
      format_value(value)
    _check_distinct(key, values, where)
    out[key] = list(values)
  return out


def merge_sweeps(base: Mapping[str, list[Any]],
                 sweep_args: Iterable[str]) -> Sweep:
  """Adds command-line --sweep arguments to a (file-defined) sweep.

  A command-line key that the file also sweeps replaces the file's values,
  so a file's grid can be narrowed without editing it.

  Args:
    base: Sweep from `--sweep_file`, or {}.
    sweep_args: The `--sweep` flag values.

  Returns:
    The combined sweep, file keys first.

  Raises:
    SweepError: On bad syntax or a key given twice on the command line.
  """
  merged = dict(base)
  seen = set()
  for arg in sweep_args:
    key, values = parse_sweep_arg(arg)
    if key in seen:
      raise SweepError(f'--sweep={arg}: {key!r} is already swept by an earlier '
                       '--sweep; list all its values in one flag')
    if key in merged:
      logging.info('--sweep for %s replaces the sweep file\'s values.', key)
    seen.add(key)
    merged[key] = values
  return merged


# ---------------------------------------------------------------- naming


def _short_hash(text: str) -> str:
  return hashlib.sha1(text.encode('utf-8')).hexdigest()[:8]


def _name_part(value: Any) -> str:
  text = _canonical_text(value)
  if _SAFE_VALUE_RE.match(text):
    return text
  # Keep a readable hint, and a hash so distinct values stay distinct.
  hint = re.sub(r'[^A-Za-z0-9._+-]+', '_', text).strip('_.')[:40]
  return f'{hint}-{_short_hash(text)}' if hint else _short_hash(text)


def run_name(params: Mapping[str, Any]) -> str:
  """Directory name of one grid point, e.g. `optimizer.learning_rate=0.1`.

  Args:
    params: The point's key -> value, in sweep order.

  Returns:
    `KEY=VALUE` parts joined with ','. Values with characters outside
    [A-Za-z0-9._+-] are replaced by a sanitized hint plus a hash of their
    text, and over-long names are cut and hashed, so names are filesystem
    safe, unique per point and the same every time. `base` for no params.
  """
  if not params:
    return 'base'
  name = ','.join(f'{k}={_name_part(v)}' for k, v in params.items())
  if len(name) > _MAX_NAME_LEN:
    name = f'{name[:_MAX_NAME_LEN - 9]}-{_short_hash(name)}'
  return name


# ---------------------------------------------------------------- commands


def split_config_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
  """Separates `--config.KEY...` overrides from the other arguments.

  The sweep script passes overrides through to every run untouched, so it
  does not need to know their types; absl would reject them as unknown
  flags, hence they are removed before absl parses the rest.

  Args:
    argv: Command-line arguments (without the program name).

  Returns:
    (overrides, remaining arguments). `--config.KEY VALUE` is joined into
    `--config.KEY=VALUE`; bare boolean forms are kept as written.
  """
  overrides, rest = [], []
  i = 0
  while i < len(argv):
    arg = argv[i]
    match = _OVERRIDE_RE.match(arg)
    if arg == '--':
      rest.extend(argv[i:])
      break
    if match is None:
      rest.append(arg)
    elif match.group(3) is None and not match.group(1) and (
        i + 1 < len(argv) and not argv[i + 1].startswith('-')):
      overrides.append(f'{arg}={argv[i + 1]}')
      i += 1
    else:
      overrides.append(arg)
    i += 1
  return overrides, rest


# ---------------------------------------------------------------- files


def load_sweep_file(path: str | pathlib.Path) -> tuple[Sweep, str | None]:
  """Loads `SWEEP` (and optional `CONFIG`) from an experiments/ file.

  Args:
    path: Python file defining `SWEEP = {"key": [values...]}` and optionally
      `CONFIG = "configs/x.py:args"`.

  Returns:
    (validated sweep, CONFIG or None).

  Raises:
    SweepError: If the file is missing, lacks SWEEP, or SWEEP is malformed.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise SweepError(f'{str(path)!r} does not exist')
  spec = importlib.util.spec_from_file_location('_bn_research_sweep_file', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, 'SWEEP'):
    raise SweepError(f'{str(path)!r} does not define SWEEP')
  config = getattr(module, 'CONFIG', None)
  if config is not None and not isinstance(config, str):
    raise SweepError(f'{str(path)!r}: CONFIG must be a string like '
                     '"configs/x.py:args"')
  return check_sweep(module.SWEEP, str(path)), config


def write_sweep_json(sweep_dir: str | pathlib.Path, config: str,
                     sweep: Mapping[str, Sequence[Any]],
                     overrides: Sequence[str],
                     planned: Sequence[plan_lib.Run]) -> pathlib.Path:
  """Writes (or extends) `sweep_dir/sweep.json`.

  Run names only encode swept values, so a directory reused with another
  base config or other common overrides would mix incomparable runs and
  skip runs that were never done with these settings; that is refused.
  Reusing it with more values of the same keys extends the run list.

  Args:
    sweep_dir: The sweep's directory (created if needed).
    config: The config spec.
    sweep: Key -> values of this invocation.
    overrides: Common `--config` overrides.
    planned: The runs of this invocation.

  Returns:
    Path of sweep.json.

  Raises:
    SweepError: If the directory holds a sweep with a different base.
  """
  sweep_dir = pathlib.Path(sweep_dir)
  path = sweep_dir / rundir.SWEEP_FILE
  runs = [{'name': r.name, 'params': dict(r.params)} for r in planned]
  try:
    old = rundir.read_sweep(str(sweep_dir))
  except rundir.RunDirError as e:
    raise SweepError(str(e)) from None
  if old is not None:
    if (old.get('config') != config
        or sorted(old.get('overrides', [])) != sorted(overrides)):
      raise SweepError(
          f'{str(sweep_dir)!r} already holds a sweep of config '
          f'{old.get("config")!r} with overrides {old.get("overrides")}; '
          'use another --workdir for a different base config')
    names = {r['name'] for r in runs}
    runs += [r for r in old.get('runs', []) if r.get('name') not in names]
  sweep_dir.mkdir(parents=True, exist_ok=True)
  record = {'config': config, 'overrides': list(overrides),
            'sweep': {k: list(v) for k, v in sweep.items()}, 'runs': runs}
  # Keys unsorted: the sweep's key order is its grid order.
  rundir.write_json(str(path), record, sort_keys=False)
  return path


# ---------------------------------------------------------------- running


def parse_override(override: str) -> tuple[str, Any]:
  """`--config.KEY=VALUE` (or `--config.FLAG`, `--noconfig.FLAG`) as (key, typed value)."""
  match = _OVERRIDE_RE.match(override)
  if match is None:
    raise SweepError(f'{override!r} is not a --config.KEY=VALUE override')
  if match.group(3) is None:
    return match.group(2), not match.group(1)
  return match.group(2), parse_value(match.group(3)[1:])


def sweep(config: str | None, workdir: str, sweep_args: Sequence[str],
          sweep_file: str | None, overrides: Sequence[str],
          print_commands: bool = False, python: str = sys.executable,
          vmap: bool = False, parallel: int = 1,
          out: Callable[[str], None] = print) -> int:
  """Plans, validates, records and runs (or prints) a sweep.

  Every value of every grid point is set and validated with its key's spec, and a
  swept key that changes nothing in this configuration is refused, before sweep.json
  is written or anything runs.

  Args:
    config: Config spec, or None to take CONFIG from the sweep file.
    workdir: Sweep directory.
    sweep_args: `--sweep` values.
    sweep_file: Optional experiments/ file.
    overrides: Common `--config.KEY=VALUE` arguments.
    print_commands: Print commands instead of running them.
    python: Interpreter for the commands.
    vmap: Train every point in this process as one vmapped program.
    parallel: Separate runs launched at once.
    out: Where commands and the final table are written.

  Returns:
    Process exit code: 0, or 1 if a launched run failed.

  Raises:
    SweepError / ValueError: For any problem found before launching.
    launch.Interrupted: A signal stopped the sweep (every run saved first).
  """
  try:
    launch.check_parallel(parallel)
  except ValueError as e:
    raise SweepError(str(e)) from None
  if parallel > 1 and vmap:
    raise SweepError(f'--parallel={parallel} launches separate runs; --vmap '
                     'trains every point in one program: choose one')
  if vmap and print_commands:
    raise SweepError('--vmap trains every point in this process; there '
                     'are no per-run commands for --print_commands')
  base, file_config = ({}, None)
  if sweep_file:
    base, file_config = load_sweep_file(sweep_file)
  grid = merge_sweeps(base, sweep_args)
  config = config or file_config
  if not config:
    raise SweepError('no config: pass --config or define CONFIG in the --sweep_file')
  if not grid:
    raise SweepError('nothing to sweep: pass --sweep or --sweep_file')
  common = dict(parse_override(o) for o in overrides)
  runs = plan_lib.grid(config, workdir, grid, common)
  how = 'print' if print_commands else 'vmap' if vmap else 'processes'
  if vmap:
    plan_lib.vmap_groups(runs)  # refused now, before sweep.json is written
  write_sweep_json(workdir, config, grid,
                   [f'--config.{k}={format_value(v)}' for k, v in common.items()], runs)
  logging.info('Sweep of %d runs in %s.', len(runs), workdir)
  outcomes = plan_lib.run_plan(runs, how, parallel=parallel, python=python, out=out,
                               progress=plan_lib.print_progress)
  if print_commands:
    return 0
  failed = [o for o in outcomes if o.returncode]
  out(plan_lib.results_table(runs))
  skipped = sum(o.skipped for o in outcomes)
  logging.info('Sweep finished: %d launched, %d skipped as finished, %d failed.',
               len(outcomes) - skipped, skipped, len(failed))
  for o in failed:
    logging.error('Failed (exit code %d): %s; its output: %s', o.returncode, o.name,
                  plan_lib.log_path(next(r for r in runs if r.name == o.name)))
  return 1 if failed else 0
