r"""Training-step throughput of the Figure 1 MLP: ours (JAX) next to plain PyTorch on CPU.

    python -m scripts.bench_mnist [--steps=20000] [--threads=1] [--normalizer=batch_norm]

Both sides train the same network (784-100-100-100-10, sigmoid, BN before each sigmoid
or none, batch 60, SGD with momentum 0.9) on the same in-memory data for the same
number of steps; compile time is reported apart from the steady state. Ours runs the
engine's own chunk function (`engine.steps.make_chunk_fn`, `steps_per_dispatch` steps per
dispatch); PyTorch runs a plain eager loop. PyTorch is optional: without it only our
figure is printed.

Two more peers put our figure in context:

* the matrix multiplies alone: the network's eleven products (four forward, four weight
  gradients, three input gradients) at the same shapes, in the same compiled loop and on the same gathered
  batches, with none of BN, the sigmoids, the loss or the optimizer. It is a floor our
  step cannot beat on this machine; the ratio says how much of a step is everything else.
* `--processes=2` runs the whole benchmark in two processes at once, each pinned to its
  own core(s), as the Figure 1 job runs its two networks, and reports each process's figure next to the
  single-process one: on a machine whose two cores share vector units or caches,
  running side by side gives less than 2x.
"""

from __future__ import annotations

import os
import sys
import time

from absl import flags

from bn_research import launch

_STEPS = flags.DEFINE_integer('steps', 20_000, 'Timed training steps per side.')
_DISPATCH = flags.DEFINE_integer('steps_per_dispatch', 500, 'Our steps per dispatch.')
_THREADS = flags.DEFINE_integer('threads', 1, 'CPU threads for each framework.')
_NORMALIZER = flags.DEFINE_enum('normalizer', 'batch_norm', ['batch_norm', 'none'],
                                'With or without BN.')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Timed repetitions; the median is shown.')
_PROCESSES = flags.DEFINE_integer('processes', 1, 'Run the JAX benchmarks in this many '
                                  'processes at once (each with --threads threads).')
_OPTIONS = flags.DEFINE_string('compiler_options', None, "XLA compile options for our "
                                'programs (default: the config\'s; "" for none).')
_PIN = flags.DEFINE_bool('pin', True, 'With --threads=1, pin to one core (Linux).')
_TORCH = flags.DEFINE_bool('torch', True, 'Also time PyTorch, when it is installed.')
_EVAL_COST = flags.DEFINE_bool('eval_cost', True, "Also time one evaluation (1,000 test "
                               "images and the probe) with each eval.batch_stats option.")


_ALL_CORES: list = []  # the cores this process may use, before it pins itself


def compiler_options() -> dict:
  from bn_research import config as config_lib
  from configs import mnist_mlp
  text = _OPTIONS.value
  if text is None:
    text = mnist_mlp.get_config('bn').compiler_options
  options = config_lib.parse_compiler_options(text)
  config_lib.check_compiler_options(options)
  return options


def bench_ours(images, labels, steps: int, options: dict) -> tuple[float, float]:
  """Returns (compile seconds, steps per second) for our engine's training step."""
  import jax
  import numpy as np
  from bn_research import inputs
  from bn_research.engine import steps as steps_lib
  from configs import mnist_mlp

  config = mnist_mlp.get_config('bn' if _NORMALIZER.value == 'batch_norm' else 'baseline')
  builder = steps_lib.Builder(config, num_classes=10)
  state = jax.jit(steps_lib.make_init(builder))({}, images[:2])
  chunk = steps_lib.make_chunk_fn(steps_lib.make_train_step(builder),
                                  inputs.InMemoryInput.materialize)
  chunk_fn = jax.jit(lambda s, r, c: chunk({}, s, r, c), donate_argnums=(0,),
                     compiler_options=options or None)
  source = inputs.InMemoryInput(images, labels, batch_size=60, seed=0)
  resident = jax.device_put(source.resident)
  k = _DISPATCH.value
  t = time.perf_counter()
  state, metrics, _ = chunk_fn(state, resident, source.chunk(0, k))
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - t
  rates = []
  done = k
  for _ in range(_REPEATS.value):
    chunks = [source.chunk(done + i * k, k) for i in range(steps // k)]
    t = time.perf_counter()
    for c in chunks:
      state, metrics, _ = chunk_fn(state, resident, c)
    jax.block_until_ready(metrics)
    rates.append(len(chunks) * k / (time.perf_counter() - t))
    done += len(chunks) * k
  loss = float(np.asarray(metrics['loss'])[-1])
  print(f'  ours: final loss {loss:.4f}')
  return compile_s, sorted(rates)[len(rates) // 2]


def bench_matmul_floor(images, steps: int, options: dict) -> float:
  """Steps/s of the network's eleven matrix products alone, same shapes and batches."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from bn_research import inputs

  source = inputs.InMemoryInput(images.reshape(len(images), -1), np.zeros(len(images),
                                np.int32), batch_size=60, seed=0)
  resident = jax.device_put(source.resident['image'])
  rng = np.random.default_rng(0)
  w = [jnp.asarray(0.01 * rng.standard_normal(shape, dtype=np.float32))
       for shape in ((784, 100), (100, 100), (100, 100), (100, 10))]

  def body(carry, index):
    x = jnp.take(resident, index, axis=0)
    h1 = x @ w[0] + carry
    h2 = h1 @ w[1]
    h3 = h2 @ w[2]
    out = h3 @ w[3]
    d3 = out @ w[3].T          # input gradients of the three upper layers
    d2 = d3 @ w[2].T
    d1 = d2 @ w[1].T
    g = [x.T @ d1, h1.T @ d2, h2.T @ d3, h3.T @ out]   # weight gradients
    # A tiny dependence on every product keeps each one live and the loop sequential.
    return carry + 1e-30 * sum(jnp.sum(v[:1, :1]) for v in g), None

  k = _DISPATCH.value
  run = jax.jit(lambda carry, idx: jax.lax.scan(body, carry, idx)[0],
                compiler_options=options or None)
  carry = jnp.zeros((60, 100), jnp.float32)
  jax.block_until_ready(run(carry, source.example_indices(0, k)))
  rates, done = [], k
  for _ in range(_REPEATS.value):
    chunks = [source.example_indices(done + i * k, k) for i in range(steps // k)]
    t = time.perf_counter()
    for c in chunks:
      carry = run(carry, c)
    jax.block_until_ready(carry)
    rates.append(len(chunks) * k / (time.perf_counter() - t))
    done += len(chunks) * k
  return sorted(rates)[len(rates) // 2]


def bench_torch(images, labels, steps: int) -> tuple[float, float] | None:
  try:
    import torch
  except ImportError:
    return None
  torch.set_num_threads(_THREADS.value)
  torch.manual_seed(0)
  layers = []
  width_in = 784
  for _ in range(3):
    layers.append(torch.nn.Linear(width_in, 100, bias=_NORMALIZER.value == 'none'))
    if _NORMALIZER.value == 'batch_norm':
      layers.append(torch.nn.BatchNorm1d(100, eps=1e-5, momentum=0.01))
    layers.append(torch.nn.Sigmoid())
    width_in = 100
  layers.append(torch.nn.Linear(100, 10))
  net = torch.nn.Sequential(*layers)
  for m in net:
    if isinstance(m, torch.nn.Linear):
      torch.nn.init.normal_(m.weight, std=0.01)
  opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
  x_all = torch.from_numpy(images.reshape(len(images), -1))
  y_all = torch.from_numpy(labels.astype('int64'))
  gen = torch.Generator().manual_seed(0)
  loss_fn = torch.nn.CrossEntropyLoss()

  def run(n):
    for _ in range(n):
      idx = torch.randint(0, len(y_all), (60,), generator=gen)
      opt.zero_grad(set_to_none=True)
      loss = loss_fn(net(x_all[idx]), y_all[idx])
      loss.backward()
      opt.step()
    return float(loss.detach())

  t = time.perf_counter()
  run(50)  # warm-up (allocator, first-call overheads)
  warm = time.perf_counter() - t
  rates = []
  for _ in range(_REPEATS.value):
    t = time.perf_counter()
    loss = run(steps)
    rates.append(steps / (time.perf_counter() - t))
  print(f'  torch {torch.__version__}: final loss {loss:.4f}')
  return warm, sorted(rates)[len(rates) // 2]


def main(argv):
  del argv
  import numpy as np
  # One thread for XLA too, so the comparison is per core; set before JAX starts.
  if _THREADS.value == 1 and 'jax' not in sys.modules:
    from bn_research import launch
    os.environ['XLA_FLAGS'] = launch.with_single_thread(os.environ.get('XLA_FLAGS', ''))
    # ... and on one core: left to the scheduler, the threads of a process migrate
    # between cores, which costs 20-35% on this project's 2-core machine.
    from bn_research import cpu_placement
    _ALL_CORES.extend(cpu_placement.available_cores())
    if _PIN.value and _ALL_CORES:
      os.sched_setaffinity(0, {_ALL_CORES[0]})
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 10, 4000).astype(np.int32)
  prototypes = rng.random((10, 28, 28, 1), dtype=np.float32)
  images = np.clip(prototypes[labels] + 0.3 * rng.standard_normal(
      (4000, 28, 28, 1), dtype=np.float32), 0, 1).astype(np.float32)
  steps = _STEPS.value
  options = compiler_options()
  print(f'MNIST MLP 784-100-100-100-10 sigmoid, normalizer={_NORMALIZER.value}, batch 60, '
        f'{steps} timed steps x {_REPEATS.value}, {_THREADS.value} thread(s), '
        f'XLA options {options or "none"}')
  ours = bench_ours(images, labels, steps, options)
  floor = bench_matmul_floor(images, steps, options)
  theirs = bench_torch(images, labels, steps) if _TORCH.value else None
  print(f'{"":16s}{"setup/compile s":>16s}{"steps/s":>12s}')
  print(f'{"ours (JAX)":16s}{ours[0]:16.2f}{ours[1]:12.0f}')
  print(f'{"matmuls alone":16s}{"":16s}{floor:12.0f}')
  print(f'ratio ours/matmuls alone: {ours[1] / floor:.2f}')
  if theirs is not None:
    print(f'{"PyTorch":16s}{theirs[0]:16.2f}{theirs[1]:12.0f}')
    print(f'ratio ours/PyTorch: {ours[1] / theirs[1]:.2f}x')
  elif _TORCH.value:
    print('PyTorch not installed: pip install torch==2.13.0 (CPU) to compare.')
  if _EVAL_COST.value:
    eval_cost(images, labels)
  if _PROCESSES.value > 1:
    side_by_side(ours[1], floor)


def eval_cost(images, labels) -> None:
  """Seconds per evaluation (test set and probe) with the moving averages vs with
  Algorithm 2's population statistics (50 training batches of 60 re-estimated each time),
  through the engine's own program; compile time left out."""
  import jax
  from bn_research import inputs
  from bn_research.engine import programs
  from configs import mnist_mlp
  times = {}
  for option in ('moving_average', 'population'):
    config = mnist_mlp.get_config('bn,source=synthetic')
    config.eval.batch_stats = option
    data = inputs.RunData(
        inputs.InMemoryInput(images, labels, batch_size=60, seed=0),
        (lambda b=inputs.padded_eval_batches(images[:1000], labels[:1000], 1000): b), 10,
        images[:1000], {}, images[:2])
    program = programs.JitProgram(config, data, jax.devices()[:1], hparams={},
                                  num_members=1, vmapped=False)
    state = program.init()
    program.evaluate(state), program.probe(state)  # compile
    runs = []
    for _ in range(20):
      program._last_stats = None  # pylint: disable=protected-access
      t = time.perf_counter()
      program.evaluate(state)
      program.probe(state)
      runs.append(time.perf_counter() - t)
    times[option] = sorted(runs)[len(runs) // 2]
  print(f'one evaluation + probe (median of 20): moving averages {times["moving_average"] * 1e3:.1f} ms, '
        f'population statistics (50 batches) {times["population"] * 1e3:.1f} ms, '
        f'ratio {times["population"] / times["moving_average"]:.2f}x; x100 evaluations per '
        'Figure 1 network')


def side_by_side(ours_alone: float, floor_alone: float) -> None:
  """The same JAX benchmarks in N processes at once; each one's figures."""
  import re
  n = _PROCESSES.value
  cmd = [sys.executable, '-m', 'scripts.bench_mnist', f'--steps={_STEPS.value}',
         f'--steps_per_dispatch={_DISPATCH.value}', f'--threads={_THREADS.value}',
         f'--normalizer={_NORMALIZER.value}', f'--repeats={_REPEATS.value}',
         '--processes=1', '--notorch', '--nopin']
  if _OPTIONS.value is not None:
    cmd.append(f'--compiler_options={_OPTIONS.value}')
  # Pinned one core (share) each, as the Figure 1 job pins its two networks; the
  # environment (single-threaded XLA when --threads=1) is this process's.
  import tempfile
  from bn_research import launch
  with tempfile.TemporaryDirectory() as tmp:
    jobs = [launch.Job(f'process {i}', cmd, log=os.path.join(tmp, f'{i}.log'))
            for i in range(n)]
    launch.run_jobs(jobs, parallel=n, pin_cores=True,
                    cores=_ALL_CORES or None)
    outs = []
    for job in jobs:
      with open(job.log, errors='replace') as f:
        outs.append(f.read())
  print(f'\n{n} processes side by side (steps/s of each; alone: ours {ours_alone:.0f}, '
        f'matmuls {floor_alone:.0f}):')
  for i, out in enumerate(outs):
    ours = re.search(r'ours \(JAX\)\s+[\d.]+\s+(\d+)', out)
    floor = re.search(r'matmuls alone\s+(\d+)', out)
    if not (ours and floor):
      print(f'  process {i}: failed:\n{out[-2000:]}')
      continue
    print(f'  process {i}: ours {ours.group(1)} ({int(ours.group(1)) / ours_alone:.2f} of '
          f'alone), matmuls alone {floor.group(1)} '
          f'({int(floor.group(1)) / floor_alone:.2f} of alone)')


if __name__ == '__main__':
  launch.run_app(main)
