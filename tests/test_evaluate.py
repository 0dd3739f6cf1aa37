"""`python -m bn_research.evaluate`: top-k, crops, ensembles and BN statistics of
finished runs, each against an independent reference.

References: top-k from a NumPy argsort, crops as NumPy slicing plus a per-pixel
bilinear resize in float64, the ensemble as NumPy softmax averages of logits the
network gives on those NumPy views, and the training engine's own evaluation (which
shares none of the evaluation command's code path) for the moving-average and the
Algorithm 2 population statistics.
"""

import math
import os

import numpy as np
import pytest

from bn_research import crops
from bn_research import evaluation_files
from tests import helpers


# ---------------------------------------------------------------- pure functions


def _np_top_k(scores, labels, k):
  order = np.argsort(-scores, axis=1, kind='stable')[:, :k]
  return np.any(order == labels[:, None], axis=1).astype(np.float64)


@pytest.mark.parametrize('k', [1, 3, 5, 10, 12])
def test_top_k_matches_numpy(k):
  from bn_research import metrics
  rng = np.random.default_rng(k)
  scores = rng.normal(size=(200, 10)).astype(np.float32)
  labels = rng.integers(0, 10, size=200)
  got = np.asarray(metrics.top_k_correct(scores, labels, k))
  np.testing.assert_array_equal(got, _np_top_k(scores, labels, k))
  assert 0 < got.mean() <= 1


def test_probability_metrics_are_masked_sums():
  from bn_research import metrics
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 50, 10))
  probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  mean = probs.mean(0)
  np.testing.assert_allclose(np.asarray(metrics.mean_softmax(logits.astype(np.float32))),
                             mean, rtol=1e-5)
  labels = rng.integers(0, 10, size=50)
  mask = (np.arange(50) < 37).astype(np.float32)  # the last 13 are padding
  out = metrics.probability_metrics(mean.astype(np.float32), labels, mask, top_k=5)
  own = mean[np.arange(50), labels]
  assert float(out['count']) == 37
  assert float(out['nll_sum']) == pytest.approx(np.sum(-np.log(own)[:37]), rel=1e-5)
  assert float(out['correct']) == np.sum(_np_top_k(mean, labels, 1)[:37])
  assert float(out['correct_top5']) == np.sum(_np_top_k(mean, labels, 5)[:37])


def _np_bilinear(x, out_h, out_w):
  """float64 bilinear resize, half-pixel centres, edges repeated: pixel by pixel."""
  h, w = x.shape[:2]
  out = np.zeros((out_h, out_w) + x.shape[2:])
  for i in range(out_h):
    sy = min(max((i + 0.5) * h / out_h - 0.5, 0), h - 1)
    y0 = int(np.floor(sy)); y1 = min(y0 + 1, h - 1); fy = sy - y0
    for j in range(out_w):
      sx = min(max((j + 0.5) * w / out_w - 0.5, 0), w - 1)
      x0 = int(np.floor(sx)); x1 = min(x0 + 1, w - 1); fx = sx - x0
      out[i, j] = ((1 - fy) * (1 - fx) * x[y0, x0] + (1 - fy) * fx * x[y0, x1]
                   + fy * (1 - fx) * x[y1, x0] + fy * fx * x[y1, x1])
  return out


def _np_view(img, scale, position, flip):
  """The view as documented: a window at `scale` of each side, centred or in a corner,
  resized back to the image size, mirrored left-right if asked."""
  h, w = img.shape[:2]
  ch, cw = round(scale * h), round(scale * w)
  top = {'center': (h - ch) // 2, 'top_left': 0, 'top_right': 0,
         'bottom_left': h - ch, 'bottom_right': h - ch}[position]
  left = {'center': (w - cw) // 2, 'top_left': 0, 'bottom_left': 0,
          'top_right': w - cw, 'bottom_right': w - cw}[position]
  out = _np_bilinear(img[top:top + ch, left:left + cw], h, w)
  return out[:, ::-1] if flip else out


def test_views_match_a_numpy_crop_resize_and_flip():
  from bn_research import evaluate as ev
  rng = np.random.default_rng(1)
  images = rng.normal(size=(2, 8, 10, 3)).astype(np.float32)
  views = crops.parse_scheme(f'multi:{crops.MAX_CROPS}')
  assert len(views) == 2 * crops.MAX_CROPS and len(set(views)) == len(views)
  for view in views:
    rows, cols = crops.view_matrices(view, 8, 10)
    got = np.asarray(crops.apply_view(images, rows, cols))
    want = np.stack([_np_view(im.astype(np.float64), view.scale, view.position, view.flip)
                     for im in images])
    np.testing.assert_allclose(got, want, atol=1e-5, err_msg=view.name)
  rows, cols = crops.view_matrices(crops.View(), 8, 10)  # the whole image is the image
  np.testing.assert_allclose(np.asarray(crops.apply_view(images, rows, cols)), images, atol=1e-6)
  assert crops.parse_scheme('center') == [crops.View()]
  assert crops.parse_scheme('flip') == [crops.View(), crops.View(flip=True)]
  assert len(crops.parse_scheme('multi:3')) == 6


def _googlenet_boxes(height, width, size):
  """GoogLeNet's 144 crops as Szegedy et al. (2014, Section 7) describe them, as
  (top, left, h, w, mirrored) in the image's pixels: resize the shorter side to
  size x (256, 288, 320, 352) / 224, take the 3 squares of the shorter side along
  the longer one, from each the 4 corner and the centre size x size crops and the
  square resized, each also mirrored."""
  boxes = []
  for side in (256, 288, 320, 352):
    r = size * side / 224 / min(height, width)        # the resize factor
    rh, rw = height * r, width * r
    sq = min(rh, rw)
    for q in range(3):
      off = (max(rh, rw) - sq) * q / 2
      st, sl = (off, 0) if rh > rw else (0, off)
      m = sq - size
      windows = [(st, sl, sq, sq)] + [(st + dy, sl + dx, size, size)
                                      for dy, dx in ((0, 0), (0, m), (m, 0), (m, m),
                                                     (m / 2, m / 2))]
      for t, l, h, w in windows:
        for mirrored in (False, True):
          boxes.append((t / r, l / r, h / r, w / r, mirrored))
  return boxes


@pytest.mark.parametrize('height,width,size', [(300, 400, 224), (400, 300, 224),
                                               (28, 28, 28), (50, 90, 32)])
def test_googlenet_crops_match_an_independent_enumeration(height, width, size):
  views = crops.parse_scheme('multi:144')
  assert len(views) == 144 == 4 * 3 * 6 * 2 and len(set(views)) == 144
  got = sorted(tuple(round(x, 6) for x in crops.googlenet_window(v, height, width, size))
               + (v.flip,) for v in views)
  want = sorted(tuple(round(x, 6) for x in b[:4]) + (b[4],)
                for b in _googlenet_boxes(height, width, size))
  assert got == want
  # On square images the three squares are the image: 4 sizes x 5 crops, and the
  # image itself, each with its mirror, are the distinct windows.
  if height == width:
    assert len(set(got)) == (4 * 5 + 1) * 2


@pytest.mark.parametrize('height,width', [(60, 90), (90, 60)])
def test_googlenet_crops_of_the_three_squares_are_the_same_windows(height, width):
  """Streamed ImageNet hands over the three squares resized to S = 352/224 of the
  input: each view's window in its square, mapped back to the photograph, is the
  enumerated crop."""
  from bn_research.data import imagenet_images
  size = 32
  side = imagenet_images.squares_size(size)
  assert side == 50
  short = min(height, width)
  squares = imagenet_images.square_boxes(height, width)
  got = []
  for v in crops.parse_scheme('multi:144'):
    top, left, h, w = crops.googlenet_window(v, side, side, size)
    sq_top, sq_left, _, _ = squares[crops.SQUARES.index(v.square)]
    k = short / side
    got.append(tuple(round(x, 6) for x in (sq_top + top * k, sq_left + left * k, h * k, w * k))
               + (v.flip,))
  want = [tuple(round(x, 6) for x in b[:4]) + (b[4],)
          for b in _googlenet_boxes(height, width, size)]
  assert sorted(got) == sorted(want)
  rows, cols = crops.view_matrices(crops.parse_scheme('multi:144')[0], side, side, out=size)
  assert rows.shape == cols.shape == (size, side)


def _np_window_resize(x, top, left, h, w, out):
  """float64 bilinear resize of the (fractional) window to out x out, pixel by pixel:
  half-pixel centres, positions past the window's edges held at them."""
  height, width = x.shape[:2]
  res = np.zeros((out, out) + x.shape[2:])
  for i in range(out):
    sy = top + min(max((i + 0.5) * h / out - 0.5, 0), h - 1)
    y0 = int(np.floor(sy)); y1 = min(y0 + 1, height - 1); fy = sy - y0
    for j in range(out):
      sx = left + min(max((j + 0.5) * w / out - 0.5, 0), w - 1)
      x0 = int(np.floor(sx)); x1 = min(x0 + 1, width - 1); fx = sx - x0
      res[i, j] = ((1 - fy) * (1 - fx) * x[y0, x0] + (1 - fy) * fx * x[y0, x1]
                   + fy * (1 - fx) * x[y1, x0] + fy * fx * x[y1, x1])
  return res


# ---------------------------------------------------------------- finished runs


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """Three tiny MLP runs: A and B are the same training (seed 0), A evaluated with the
  moving averages and B with population statistics from 3 batches; C is seed 1."""
  from bn_research import train
  root = tmp_path_factory.mktemp('runs')
  settings = {'a': {}, 'b': {'eval.batch_stats': 'population', 'eval.population_batches': 3},
              'c': {'seed': 1}}
  for name, extra in settings.items():
    c = helpers.tiny_mlp_config(**extra)
    c.probe.enabled = False
    assert train.train_and_evaluate(c, str(root / name))['status'] == 'done'
  return root


def _last_eval(workdir):
  return [r for r in helpers.read_jsonl(os.path.join(workdir, 'metrics.jsonl'))
          if 'eval_accuracy' in r][-1]


def _plan(workdirs, **kw):
  from bn_research import evaluate as ev
  return ev.make_plan([str(w) for w in workdirs], **{'crops': ['center'], **kw})


def _row(record, name, crops='center'):
  (row,) = [r for r in record['rows'] if r['name'] == str(name) and r['crops'] == crops]
  return row


def test_centre_crop_is_the_engines_evaluation_with_either_statistics(runs):
  """The engine evaluated A with the moving averages and B (the same weights) with
  population statistics: the command reproduces each, from either run."""
  from bn_research import evaluate as ev
  a, b = runs / 'a', runs / 'b'
  engine_ma, engine_pop = _last_eval(a), _last_eval(b)
  assert engine_ma['eval_accuracy'] != engine_pop['eval_accuracy']  # the paths differ
  for workdir, stats, want in [(a, 'run', engine_ma), (b, 'run', engine_pop),
                               (a, 'population', engine_pop), (b, 'moving_average', engine_ma)]:
    record = ev.evaluate(_plan([workdir], batch_stats=stats, population_batches=3))
    row = _row(record, workdir)
    assert row['top1_accuracy'] == pytest.approx(want['eval_accuracy'], abs=1e-6), stats
    assert row['nll'] == pytest.approx(want['eval_loss'], rel=1e-4), stats
    assert row['count'] == 128
  assert record['runs'][0]['batch_stats'] == 'moving_average'


def test_multi_crop_ensemble_matches_numpy(runs):
  """Top-1/top-5 of each member and of the ensemble over flips and 2 crops: NumPy views
  through each network, NumPy softmax averages over views, then over members."""
  import jax
  from bn_research import evaluate as ev
  from bn_research import inputs, rundir
  from bn_research.engine import steps
  members = [runs / 'a', runs / 'c']
  record = ev.evaluate(_plan(members, crops=['center', 'multi:2'], ensemble=True))
  config = ev.config_from_json(rundir.read_config(str(members[0])))
  data = inputs.load_run_data(config)
  images = np.concatenate([b['image'][b['mask'] > 0] for b in data.eval_batches()])
  labels = np.concatenate([b['label'][b['mask'] > 0] for b in data.eval_batches()])
  views = [(1.0, 'center', False), (1.0, 'center', True),
           (0.875, 'center', False), (0.875, 'center', True)]
  view_images = [np.stack([_np_view(im.astype(np.float64), *v) for im in images])
                 for v in views]
  member_probs = []
  for workdir in members:
    state = rundir.load_latest(str(workdir))
    model = steps.Builder(ev.config_from_json(rundir.read_config(str(workdir))),
                          10).model({}, dropout=False)
    variables = {'params': state['params'], 'batch_stats': state['batch_stats']}
    probs = []
    for v in view_images:
      logits = np.asarray(jax.jit(lambda x: model.apply(variables, x, train=False))(
          v.astype(np.float32)), np.float64)
      probs.append(np.exp(logits - logits.max(1, keepdims=True)))
      probs[-1] /= probs[-1].sum(1, keepdims=True)
    member_probs.append(np.mean(probs, axis=0))
    row = _row(record, workdir, 'multi:2')
    assert row['views'] == 4
    assert row['top1_accuracy'] == pytest.approx(_np_top_k(member_probs[-1], labels, 1).mean())
    assert row['top5_accuracy'] == pytest.approx(_np_top_k(member_probs[-1], labels, 5).mean())
    centre = _row(record, workdir)
    assert centre['top1_accuracy'] == pytest.approx(_np_top_k(probs[0], labels, 1).mean())
    # The training engine logs top-5 too: the same numbers on the centre view.
    assert _last_eval(workdir)['eval_top5_accuracy'] == pytest.approx(
        _np_top_k(probs[0], labels, 5).mean())
  ensemble = np.mean(member_probs, axis=0)
  row = _row(record, 'ensemble', 'multi:2')
  assert row['top1_accuracy'] == pytest.approx(_np_top_k(ensemble, labels, 1).mean())
  assert row['top5_accuracy'] == pytest.approx(_np_top_k(ensemble, labels, 5).mean())
  assert row['nll'] == pytest.approx(
      -np.mean(np.log(ensemble[np.arange(len(labels)), labels])), rel=1e-4)
  # The summary pairs the ensemble with its member of the highest top-1.
  (summary,) = [c for c in record['ensemble_vs_best_single'] if c['crops'] == 'multi:2']
  best = max(members, key=lambda w: _row(record, w, 'multi:2')['top1_accuracy'])
  assert summary['best_single'] == str(best)
  assert summary['ensemble_top5_accuracy'] == row['top5_accuracy']


def _googlenet_probabilities(workdir, config, num_classes, planes, size):
  """Per view of `_googlenet_boxes`, the network's class probabilities (float64) on
  the NumPy view. planes: (3, S, S, N, C) float64, square q of each image (in-memory
  data: the image itself three times); the enumeration on an S x S image gives each
  square's windows, in the order size, square, crop, mirror (box i: square
  (i // 12) % 3)."""
  import jax
  from bn_research import rundir
  from bn_research.engine import steps
  state = rundir.load_latest(str(workdir))
  model = steps.Builder(config, num_classes).model({}, dropout=False)
  variables = {'params': state['params'], 'batch_stats': state['batch_stats']}
  apply = jax.jit(lambda x: model.apply(variables, x, train=False))
  side = planes.shape[1]
  probs = []
  for i, (top, left, h, w, mirrored) in enumerate(_googlenet_boxes(side, side, size)):
    view = np.moveaxis(_np_window_resize(planes[(i // 12) % 3], top, left, h, w, size), 2, 0)
    if mirrored:
      view = view[:, :, ::-1]
    logits = np.asarray(apply(view.astype(np.float32)), np.float64)
    p = np.exp(logits - logits.max(1, keepdims=True))
    probs.append(p / p.sum(1, keepdims=True))
  return probs


def test_googlenet_144_crops_average_like_numpy(runs):
  """multi:144 on a run's square images: the 144 NumPy views (the enumeration above,
  resized pixel by pixel) through the network, NumPy softmax averaged."""
  from bn_research import evaluate as ev
  from bn_research import inputs, rundir
  workdir = runs / 'a'
  record = ev.evaluate(_plan([workdir], crops=['multi:144'], num_eval_examples=64))
  config = ev.config_from_json(rundir.read_config(str(workdir)))
  config.num_eval_examples = 64
  data = inputs.load_run_data(config)
  images = np.concatenate([b['image'][b['mask'] > 0] for b in data.eval_batches()])
  labels = np.concatenate([b['label'][b['mask'] > 0] for b in data.eval_batches()])
  n, size = len(images), images.shape[1]
  assert images.shape[2] == size and n == 64
  stacked = np.moveaxis(images.astype(np.float64), 0, 2)   # (H, W, N, C)
  mean = np.mean(_googlenet_probabilities(workdir, config, 10, np.stack([stacked] * 3),
                                          size), axis=0)
  row = _row(record, workdir, 'multi:144')
  assert row['views'] == 144 and row['count'] == 64
  assert row['top1_accuracy'] == pytest.approx(_np_top_k(mean, labels, 1).mean())
  assert row['top5_accuracy'] == pytest.approx(_np_top_k(mean, labels, 5).mean())
  assert row['nll'] == pytest.approx(-np.mean(np.log(mean[np.arange(n), labels])), rel=1e-4)


def test_googlenet_144_crops_of_streamed_imagenet_average_like_numpy(tmp_path):
  """On (mock) streamed ImageNet the pipeline hands over each photograph's three
  squares; the 144 views of them (NumPy, pixel by pixel, from the enumeration) through
  the network, softmax averaged in NumPy, give the command's NLL and top-k."""
  import tensorflow_datasets as tfds
  from bn_research import evaluate as ev
  from bn_research import rundir, train
  from bn_research.data import imagenet
  from configs import imagenet_inception
  workdir, data_dir = str(tmp_path / 'run'), tmp_path / 'tfds'
  data_dir.mkdir()
  c = imagenet_inception.get_config('model=bn_x30,steps=3')
  c.batch_size = c.eval_batch_size = 8
  c.model.name = 'mlp'
  c.model.hidden_sizes = (16, 16)
  c.model.virtual_batch_size = 0
  c.data.image_size = 8
  c.data.num_workers = c.data.prefetch = 0
  c.data.data_dir = str(data_dir)
  c.num_eval_examples = 0
  c.log_every_steps = c.eval_every_steps = c.checkpoint_every_steps = 3
  c.eval.batch_stats = 'moving_average'
  c.probe.enabled = False
  with tfds.testing.mock_data(num_examples=20):
    assert train.train_and_evaluate(c, workdir)['status'] == 'done'
    record = ev.evaluate(ev.make_plan([workdir], crops=['multi:144']))
    config = ev.config_from_json(rundir.read_config(workdir))
    config.data.eval_views = 'squares'
    batches = list(imagenet.ImageNetPipeline(
        config.data, batch_size=8, seed=0, process_index=0, process_count=1).eval_batches(8))
  squares = np.concatenate([b['image'][b['mask'] > 0] for b in batches])
  labels = np.concatenate([b['label'][b['mask'] > 0] for b in batches])
  n, side = len(squares), squares.shape[2]
  assert squares.shape == (20, 3, side, side, 3) and side == round(8 * 352 / 224)
  planes = np.moveaxis(squares.astype(np.float64) / 255 * 2 - 1, 0, 3)  # (3, S, S, N, C)
  probs = _googlenet_probabilities(workdir, config, 1000, planes, 8)
  mean = np.mean(probs, axis=0)
  (row,) = record['rows']
  assert row['views'] == 144 and row['count'] == 20
  assert row['nll'] == pytest.approx(-np.mean(np.log(mean[np.arange(n), labels])), rel=1e-6)
  assert row['top5_accuracy'] == pytest.approx(_np_top_k(mean, labels, 5).mean())
  centre = -np.mean(np.log(probs[0][np.arange(n), labels]))  # one view is not the average
  assert abs(row['nll'] - centre) > 1e-5


def test_command_writes_json_and_markdown(runs, tmp_path):
  out = tmp_path / 'out'
  proc = helpers.run_module('bn_research.evaluate',
                            [f'--workdir={runs / "a"}', f'--workdir={runs / "c"}',
                             '--crops=center,flip', '--ensemble', f'--out={out}',
                             '--name=ens'])
  assert proc.returncode == 0, proc.stderr[-3000:]
  record = helpers.read_json(out / 'ens.json')
  assert [(r['name'], r['crops']) for r in record['rows']] == [
      (str(runs / 'a'), 'center'), (str(runs / 'a'), 'flip'),
      (str(runs / 'c'), 'center'), (str(runs / 'c'), 'flip'),
      ('ensemble', 'center'), ('ensemble', 'flip')]
  assert _row(record, runs / 'a')['top1_accuracy'] == pytest.approx(
      _last_eval(runs / 'a')['eval_accuracy'], abs=1e-6)
  text = (out / 'ens.md').read_text()
  assert '| ensemble |' in text and 'python -m bn_research.evaluate' in text
  assert math.isfinite(record['rows'][-1]['nll'])


def test_two_devices_give_the_one_device_result(runs, tmp_path):
  """Each held-out batch sharded over 2 (forced host) devices, the variables
  replicated: every row (top-1, top-5, NLL, count) equals the 1-device evaluation's,
  for single runs, multi-crop and the ensemble."""
  records = {}
  for devices in (1, 2):
    out = tmp_path / f'devices{devices}'
    proc = helpers.run_module('bn_research.evaluate',
                              [f'--workdir={runs / "a"}', f'--workdir={runs / "c"}',
                               '--crops=center,multi:3', '--ensemble', f'--out={out}'],
                              devices=devices)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records[devices] = helpers.read_json(out / 'evaluation.json')
  assert [r['devices'] for r in records[2]['runs']] == [2, 2]
  assert len(records[1]['rows']) == len(records[2]['rows']) == 6
  for one, two in zip(records[1]['rows'], records[2]['rows']):
    assert (two['name'], two['crops'], two['count']) == (one['name'], one['crops'],
                                                          one['count'])
    for key in ('top1_accuracy', 'top5_accuracy', 'nll'):
      assert two[key] == pytest.approx(one[key], rel=1e-5, abs=1e-6), (one['name'], key)


def test_an_eval_batch_the_devices_cannot_split_is_refused(runs, tmp_path):
  _copy_run(runs / 'a', tmp_path / 'odd', eval_batch_size=63)
  proc = helpers.run_module('bn_research.evaluate', [f'--workdir={tmp_path / "odd"}',
                                                     f'--out={tmp_path / "out"}'], devices=2)
  assert proc.returncode == 2
  assert len(proc.stderr.strip().splitlines()) == 1
  assert 'eval_batch_size=63' in proc.stderr and '2 devices' in proc.stderr
  assert not (tmp_path / 'out').exists()


# ---------------------------------------------------------------- refusals


def _copy_run(src, dst, **config_changes):
  """A copy of a run directory with some config.json keys changed."""
  import shutil
  shutil.copytree(src, dst)
  config = helpers.read_json(dst / 'config.json')
  for key, value in config_changes.items():
    *path, last = key.split('.')
    node = config
    for p in path:
      node = node[p]
    node[last] = value
  from bn_research import rundir
  rundir.write_json(str(dst / 'config.json'), config)
  return dst


def _refuse(args, *words):
  proc = helpers.run_module('bn_research.evaluate', args)
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and all(w in lines[0] for w in words), proc.stderr


def test_refusals_are_one_line_and_write_nothing(runs, tmp_path):
  import shutil
  a = str(runs / 'a')
  no_ckpt = tmp_path / 'no_ckpt'
  shutil.copytree(runs / 'a', no_ckpt)
  shutil.rmtree(no_ckpt / 'checkpoints')
  running = _copy_run(runs / 'a', tmp_path / 'running')
  (running / 'status.json').write_text('{"status": "running", "step": 20}')
  tiny = _copy_run(runs / 'a', tmp_path / 'tiny', **{'data.image_size': 4})
  other_data = _copy_run(runs / 'a', tmp_path / 'other_data', **{'data.num_test': 100})
  other_model = _copy_run(runs / 'a', tmp_path / 'other_model', **{'model.name': 'small_cnn'})
  before = sorted(p for p in tmp_path.rglob('*'))
  before_runs = sorted(p for p in runs.rglob('*'))
  _refuse([f'--workdir={no_ckpt}'], 'no_ckpt', 'no checkpoint')
  _refuse([f'--workdir={tmp_path / "missing"}'], 'missing', 'not a directory')
  _refuse([f'--workdir={tmp_path}'], 'config.json')
  _refuse([f'--workdir={running}'], 'not finished', "'running'")
  _refuse([f'--workdir={a}', '--crops=multi:17'], 'multi:17', 'N in [1, 16]')
  _refuse([f'--workdir={a}', '--crops=corner'], "'corner'", 'center, flip')
  _refuse([f'--workdir={tiny}', '--crops=multi:2'], 'multi:2', '4x4', 'N <= 1')
  _refuse([f'--workdir={a}', f'--workdir={other_data}', '--ensemble'],
          'data.num_test=100', 'same data')
  _refuse([f'--workdir={a}', f'--workdir={other_model}', '--ensemble'],
          "model.name='small_cnn'", 'same network')
  _refuse([f'--workdir={a}', '--ensemble'], '2 or more')
  _refuse([f'--workdir={a}', f'--workdir={a}'], 'given twice')
  _refuse([], '--workdir is required')
  assert sorted(p for p in tmp_path.rglob('*')) == before
  assert sorted(p for p in runs.rglob('*')) == before_runs
  # The 4x4 images still take the schemes that fit them.
  from bn_research import evaluate as ev
  crops.check_scheme_fits('flip', crops.parse_scheme('flip'), 4, 4)


def test_committed_ensemble_results_md_is_written_from_its_json():
  """experiments/results/ensemble_small.md is the command's table of its JSON, and the
  JSON's summary is the best member per scheme, recomputed from its rows."""
  from bn_research import evaluate as ev
  path = os.path.join(helpers.REPO, 'experiments', 'results', 'ensemble_small')
  record = helpers.read_json(path + '.json')
  with open(path + '.md') as f:
    assert f.read() == evaluation_files.markdown(record)
  for summary in record['ensemble_vs_best_single']:
    members = [r for r in record['rows']
               if r['crops'] == summary['crops'] and r['name'] != 'ensemble']
    assert summary['best_single_top1_accuracy'] == max(r['top1_accuracy'] for r in members)
  assert {r['batch_stats'] for r in record['runs']} == {'population'}
  assert all(r['count'] == 2000 for r in record['rows'])
