r"""The one driver of every experiment job: flags, plan, training, reading, outputs.

An experiment is a module with a plan, a summary and a figure; this driver does the
rest. A minimal one (`experiments/lr_pair.py`):

    '''Two learning rates of the MNIST MLP with BN.

        python -m experiments.lr_pair --workdir=runs/lr_pair --steps=2000
    '''
    from bn_research import checks
    from bn_research import experiment
    from bn_research import plan as plan_lib

    NAME = 'lr_pair'                    # writes <workdir>/lr_pair.{json,md,png}
    WORKDIR = 'runs/lr_pair'            # the default --workdir
    HOW, PARALLEL = 'processes', 2      # the default backend (plan.HOWS)
    FLAGS = {'steps': experiment.Flag(int, 2000, 'Steps per run.', checks.Int(1))}

    def plan(args):
      return [plan_lib.make_run(
          f'lr={lr}', f'{args.workdir}/lr={lr}', 'configs/mnist_mlp.py:bn',
          {'num_train_steps': args.steps, 'optimizer.learning_rate': lr,
           **args.overrides}) for lr in (0.1, 0.5)]

    def summarize(records, args):
      return {r.name: experiment.final(r, 'eval_accuracy') for r in records}

    def table(summary):
      return experiment.markdown_table(['run', 'final test accuracy'],
                                       sorted(summary.items()))

    def plot(summary):
      fig, ax = experiment.figure()
      ax.bar(list(summary), [v or 0 for v in summary.values()])
      ax.set_ylabel('final test accuracy')
      return fig

    if __name__ == '__main__':
      experiment.main(__name__)

Every job gets the same flags: `--workdir`, `--set=KEY=VALUE` (a typed config override
for every run, repeatable; `args.overrides`), `--how` and `--parallel` (the backend),
`--pin_cores`, `--overwrite`, `--verbosity`, `--help`; plus its own `FLAGS`, each
parsed with its kind and checked with its `checks.Spec` before anything is created.
`plan(args)` must build (and so validate) every run before the driver creates the
workdir. A job whose runs read files it writes itself (a data subset) defines
`prepare(args, runs) -> runs`: called once the plan is valid, before any run starts,
also for `--how=print` (the printed commands read those files too); it returns the runs
to train (the plan's, or them re-made to read what it wrote). Library errors become one line on stderr and exit code 2; a signal stops every
run (each saves) and exits 128 + signum; a diverged run is summarised like any other.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import platform
import shlex
import signal
import sys
import time
import types
from typing import Any, Iterator, Optional, Sequence

from absl import flags

from bn_research import checks
from bn_research import launch
from bn_research import log_filter
from bn_research import plan as plan_lib
from bn_research import rundir
from bn_research import signals
from bn_research import sweep as sweep_lib

# One colour per network across every figure: BN always blue, no normalizer always
# orange (Figure 1's pair), each other normalizer its own.
COLORS = {'bn': 'tab:blue', 'batch_norm': 'tab:blue', 'baseline': 'tab:orange',
          'none': 'tab:orange', 'noisy_bn': 'tab:olive', 'noisy_batch_norm': 'tab:olive',
          'batch_renorm': 'tab:green', 'layer_norm': 'tab:purple', 'group_norm': 'tab:red',
          'virtual_batch_norm': 'tab:cyan', 'stop_gradient': 'tab:brown',
          'stop_gradient_batch_norm': 'tab:brown'}

_KINDS = {int: 'an integer', float: 'a number', str: 'text', bool: 'true or false',
          'ints': 'integers separated by commas', 'floats': 'numbers separated by commas',
          'strs': 'names separated by commas'}


@dataclasses.dataclass(frozen=True)
class Flag:
  """One flag of an experiment.

  Attributes:
    kind: int, float, str, bool, or 'ints' / 'floats' / 'strs' (comma-separated lists,
      given to the experiment as tuples).
    default: the value when not given (None: not given).
    help: what it means (shown by --help).
    spec: the check of a given value (of each element, for lists); None: any value.
  """

  kind: Any
  default: Any
  help: str
  spec: Optional[checks.Spec] = None


@dataclasses.dataclass(frozen=True)
class RunRecord:
  """A run as the driver read it back through the run-directory readers.

  Attributes:
    run: the planned run (name, workdir, config).
    status: status.json ({} if the run never started).
    metrics: metrics.jsonl rows, oldest first.
    config: config.json as written by the run.
    data: data.json: what the run trained on.
  """

  run: plan_lib.Run
  status: dict
  metrics: list
  config: dict
  data: dict

  @property
  def name(self) -> str:
    return self.run.name

  def curve(self, key: str) -> list[list[float]]:
    """[[step, value]] of every metrics row holding `key`."""
    return [[r['step'], r[key]] for r in self.metrics if key in r]


def read(run: plan_lib.Run) -> RunRecord:
  """Reads one run's files (rundir readers); missing files read as empty."""
  return RunRecord(run, rundir.read_status(run.workdir) or {},
                   rundir.read_metrics(run.workdir) if os.path.isdir(run.workdir) else [],
                   rundir.read_config(run.workdir) or {},
                   rundir.read_description(run.workdir) or {})


def final(record: RunRecord, key: str) -> Optional[float]:
  """The last value of a metric, or None if it was never logged."""
  curve = record.curve(key)
  return curve[-1][1] if curve else None


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  """A Markdown table; floats with 4 decimals, None as '-'."""
  def cell(v):
    return '-' if v is None else f'{v:.4f}' if isinstance(v, float) else str(v)
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  lines += ['| ' + ' | '.join(cell(v) for v in row) + ' |' for row in rows]
  return '\n'.join(lines)


def figure(ncols: int = 1, width: float = 6.0, height: float = 4.2, nrows: int = 1):
  """A matplotlib (Agg) figure of `nrows` x `ncols` axes, each `width` x `height`
  inches: (fig, ax), or (fig, axes) as matplotlib's subplots gives them."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows))


# ---------------------------------------------------------------- flags


def parse_flag(name: str, flag: Flag, text: Any) -> Any:
  """A flag's text as its kind, checked with its spec; ValueError naming `--name`."""
  if text is None or flag.kind is bool:
    value = text
  else:
    scalar = {'ints': int, 'floats': float, 'strs': str}.get(flag.kind, flag.kind)
    parts = [p.strip() for p in str(text).split(',')] if isinstance(flag.kind, str) else [text]
    try:
      values = tuple(scalar(sweep_lib.parse_value(p)) if scalar is not str else p
                     for p in parts)
      if scalar is int and any(str(v) != p.strip().lstrip('+') for v, p in zip(values, parts)):
        raise ValueError
    except (TypeError, ValueError):
      raise ValueError(f'--{name}={text!r} is invalid: must be {_KINDS[flag.kind]}.') from None
    value = values if isinstance(flag.kind, str) else values[0]
  if value is not None and flag.spec is not None:
    for v in (value if isinstance(flag.kind, str) else (value,)):
      flag.spec.check(f'--{name}', v)
    if isinstance(flag.kind, str) and len(set(value)) != len(value):
      raise ValueError(f'--{name}={text!r} is invalid: a value is listed twice.')
  return value


def _define_flags(module: types.ModuleType) -> dict[str, Any]:
  own = getattr(module, 'FLAGS', {})
  handles = {
      'workdir': flags.DEFINE_string('workdir', getattr(module, 'WORKDIR', None),
                                     'Output directory: one sub-directory per run, and '
                                     'the job\'s .json, .md and .png.'),
      'set': flags.DEFINE_multi_string('set', [], 'KEY=VALUE: a config override for every '
                                       'run, e.g. --set=optimizer.learning_rate=0.5 '
                                       '(repeatable).'),
      'how': flags.DEFINE_enum('how', getattr(module, 'HOW', 'processes'), plan_lib.HOWS,
                               'How the runs train: inline (this process, one after '
                               'another), vmap (one program), processes, or print (the '
                               'commands, for a queue).'),
      'parallel': flags.DEFINE_integer('parallel', getattr(module, 'PARALLEL', 1),
                                       'Processes at once (--how=processes).'),
      'pin_cores': flags.DEFINE_bool('pin_cores', True, 'Pin each process to its own '
                                     'share of the CPU cores (Linux), when there are enough.'),
      'overwrite': flags.DEFINE_bool('overwrite', False, 'A run directory of a different '
                                     'config is moved aside (renamed, never deleted).'),
  }
  for name, flag in own.items():
    if flag.kind is bool:
      handles[name] = flags.DEFINE_bool(name, flag.default, flag.help)
    else:
      default = (None if flag.default is None else ','.join(map(str, flag.default))
                 if isinstance(flag.kind, str) else str(flag.default))
      handles[name] = flags.DEFINE_string(name, default, flag.help)
  return handles


def parse_args(module: types.ModuleType, handles: dict[str, Any],
               argv: Sequence[str]) -> types.SimpleNamespace:
  """Every flag typed and checked; ValueError naming the first bad one."""
  if len(argv) > 1:
    raise ValueError(f'unexpected arguments: {" ".join(argv[1:])}; every input is a '
                     '--flag (see --help).')
  args = types.SimpleNamespace()
  for name, flag in getattr(module, 'FLAGS', {}).items():
    setattr(args, name, parse_flag(name, flag, handles[name].value))
  args.workdir = handles['workdir'].value
  if not args.workdir:
    raise ValueError('--workdir is required.')
  if os.path.exists(args.workdir) and not os.path.isdir(args.workdir):
    raise ValueError(f'--workdir={args.workdir!r} is a file, not a directory.')
  rundir.check_workdir_parent(args.workdir)
  args.how, args.parallel = handles['how'].value, handles['parallel'].value
  launch.check_parallel(args.parallel)
  args.pin_cores, args.overwrite = handles['pin_cores'].value, handles['overwrite'].value
  args.overrides = {}
  for text in handles['set'].value:
    key, eq, value = text.partition('=')
    if not eq or not key.strip():
      raise ValueError(f'--set={text!r} is invalid: must be KEY=VALUE, e.g. '
                       '--set=optimizer.learning_rate=0.5.')
    if key.strip() in args.overrides:
      raise ValueError(f'--set={text!r}: {key.strip()} is set twice.')
    args.overrides[key.strip()] = sweep_lib.parse_value(value)
  return args


# ---------------------------------------------------------------- the driver


def machine() -> str:
  """What the numbers were measured on, in words."""
  return f'{os.cpu_count()}-core {platform.machine()} CPU ({platform.system()})'


def write_outputs(module: types.ModuleType, workdir: str, summary: dict,
                  extra: dict) -> dict[str, str]:
  """Writes <workdir>/<NAME>.json (the summary and `extra`: the command and the wall
  time), .md (the table, the command, the date, the machine) and .png; their paths.
  A job's `OUTPUTS` ({'png': 'figure2', ...}) names any of them otherwise."""
  name, command = module.NAME, extra['command']
  stems = {ext: name for ext in ('json', 'md', 'png')}
  stems.update(getattr(module, 'OUTPUTS', {}))  # e.g. the paper's figure numbers
  paths = {ext: os.path.join(workdir, f'{stem}.{ext}') for ext, stem in stems.items()}
  with open(paths['json'], 'w') as f:
    json.dump({**summary, **{k: v for k, v in extra.items() if k not in summary}}, f,
              indent=1)
  table = module.table(summary)
  date = datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')
  doc = (module.__doc__ or name).strip().splitlines()[0]
  with open(paths['md'], 'w') as f:
    f.write(f'# {doc}\n\n{table}\n\nCommand: `{command}`\n\nDate: {date}\n\n'
            f'Machine: {machine()}\n')
  fig = module.plot(summary)
  fig.savefig(paths['png'], dpi=110)
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  plt.close(fig)
  return paths


def record_sweeps(runs: Sequence[plan_lib.Run]) -> None:
  """Writes sweep.json into every directory whose runs vary keys of one config file, so
  that `scripts.compare DIR` and the analysis readers see a job's sweeps as sweeps."""
  by_dir: dict[str, list[plan_lib.Run]] = {}
  for r in runs:
    if r.params:
      by_dir.setdefault(os.path.dirname(os.path.abspath(r.workdir)), []).append(r)
  for directory, group in by_dir.items():
    if len({r.spec for r in group}) != 1:
      continue
    keys = [k for k, _ in group[0].params]
    grid: dict[str, list[Any]] = {k: [] for k in keys}
    for r in group:
      for k, v in r.params:
        if v not in grid.setdefault(k, []):
          grid[k].append(v)
    common = [f'--config.{k}={plan_lib.format_value(v)}' for k, v in group[0].overrides
              if k not in grid]
    sweep_lib.write_sweep_json(directory, group[0].spec, grid, common, group)


def module_name(module: types.ModuleType) -> str:
  """`experiments.x` also when run as `python -m experiments.x` (then named __main__)."""
  spec = getattr(module, '__spec__', None)
  return spec.name if spec is not None else module.__name__


# What a job turns into one line and exit code 2 (RunDirError is a ValueError).
LIBRARY_ERRORS = (ValueError, FileExistsError, NotADirectoryError)


def _fail(program: str, message: str, code: int) -> None:
  print(f'{program}: error: {message}' if code == 2 else f'{program}: {message}',
        file=sys.stderr)
  sys.exit(code)


@contextlib.contextmanager
def one_line_errors(program: str) -> Iterator[None]:
  """Within: a library error is one line on stderr and exit code 2; a signal that
  stopped the work (launch.Interrupted, the engine's Interrupted: anything carrying a
  `signum`) or Ctrl-C is one line and exit code 128 + signum."""
  try:
    yield
  except LIBRARY_ERRORS as e:
    _fail(program, str(e), 2)
  except KeyboardInterrupt:
    _fail(program, 'interrupted by signal 2; the same command resumes', 130)
  except Exception as e:  # pylint: disable=broad-except
    if not isinstance(getattr(e, 'signum', None), int):
      raise
    _fail(program, f'{e}; the same command resumes'
          if 'resumes' not in str(e) else str(e), 128 + e.signum)


def _raise_interrupted(signum, frame):
  del frame
  raise launch.Interrupted(signum)


def run(module: types.ModuleType, handles: dict[str, Any], argv: Sequence[str]) -> None:
  """Parses, plans, trains, reads, summarises and writes: the whole job."""
  program = module_name(module).rsplit('.', 1)[-1]
  log_filter.quiet_library_logs()
  with one_line_errors(program):
    args = parse_args(module, handles, argv)
    runs = module.plan(args)
    plan_lib.check_names(runs)
  signals.started(program)
  for sig in (signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, _raise_interrupted)
  t0 = time.time()
  with one_line_errors(program):
    if hasattr(module, 'prepare'):
      runs = module.prepare(args, runs)
    record_sweeps(runs)
    if args.how != 'print':
      os.makedirs(args.workdir, exist_ok=True)
    outcomes = plan_lib.run_plan(
        runs, args.how, parallel=args.parallel, pin_cores=args.pin_cores,
        overwrite=args.overwrite, progress=plan_lib.print_progress)
  if args.how == 'print':
    return
  failed = [o for o in outcomes if o.returncode]
  for o in failed:
    run_ = next(r for r in runs if r.name == o.name)
    with open(plan_lib.log_path(run_), errors='replace') as f:
      tail = f.read()[-3000:]
    print(f'--- {o.name} failed (exit code {o.returncode}); end of '
          f'{plan_lib.log_path(run_)}:\n{tail}', file=sys.stderr)
  if failed:
    _fail(program, f'training failed for: {", ".join(o.name for o in failed)}', 1)
  with one_line_errors(program):
    summary = module.summarize([read(r) for r in runs], args)
  command = shlex.join(['python', '-m', module_name(module)] + list(sys.argv[1:]))
  extra = {'wall_seconds': round(time.time() - t0, 2), 'command': command}
  paths = write_outputs(module, args.workdir, summary, extra)
  print('\n' + module.table(summary))
  print(f'\nwrote {paths["png"]}, {paths["json"]} and {paths["md"]} '
        f'in {extra["wall_seconds"]} s')
  for line in summary.get('warnings', []):
    print(f'WARNING: {line}')


def main(name: str) -> None:
  """The entry point of `python -m experiments.<name>`: `experiment.main(__name__)`."""
  module = sys.modules[name]
  signals.record_until_started(module_name(module).rsplit('.', 1)[-1])
  handles = _define_flags(module)

  def parser(argv: Sequence[str]) -> list[str]:
    try:
      return flags.FLAGS(list(argv))
    except flags.Error as e:
      print(f'{module_name(module).rsplit(".", 1)[-1]}: error: {e}', file=sys.stderr)
      sys.exit(2)

  launch.run_app(lambda argv: run(module, handles, argv), flags_parser=parser)
