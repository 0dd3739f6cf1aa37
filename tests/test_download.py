"""data.source='download' and 'auto' against a loopback HTTP server (127.0.0.1 only)."""

import functools
import hashlib
import http.server
import os
import socket
import threading

import numpy as np
import pytest

from bn_research import data as data_lib
from bn_research.data import download as download_lib
from tests import helpers

_FILES = {
    'train-images-idx3-ubyte.gz': (0, 'images', 12),
    'train-labels-idx1-ubyte.gz': (0, 'labels', 12),
    't10k-images-idx3-ubyte.gz': (1, 'images', 6),
    't10k-labels-idx1-ubyte.gz': (1, 'labels', 6),
}


def _make_mirror(root):
  """Writes four small valid IDX .gz files; returns (arrays by file name, their
  {name: (size, sha256)} table as TFDS would publish it)."""
  rng = np.random.default_rng(0)
  arrays, table = {}, {}
  for filename, (_, kind, n) in _FILES.items():
    array = (rng.integers(0, 256, (n, 6, 6), dtype=np.uint8) if kind == 'images'
             else rng.integers(0, 10, (n,), dtype=np.uint8))
    path = os.path.join(root, filename)
    data_lib.write_idx(path, array)
    with open(path, 'rb') as f:
      raw = f.read()
    arrays[filename] = array
    table[filename] = (len(raw), hashlib.sha256(raw).hexdigest())
  return arrays, table


class _Quiet(http.server.SimpleHTTPRequestHandler):
  def log_message(self, *args):  # keep the test output clean
    pass


@pytest.fixture
def mirror(tmp_path, monkeypatch):
  """A loopback server over a directory of small MNIST-layout files whose sizes and
  checksums replace the published ones for 'mnist'."""
  root = tmp_path / 'mirror'
  root.mkdir()
  arrays, table = _make_mirror(str(root))
  monkeypatch.setitem(download_lib.PUBLISHED, 'mnist', table)
  server = http.server.ThreadingHTTPServer(
      ('127.0.0.1', 0), functools.partial(_Quiet, directory=str(root)))
  thread = threading.Thread(target=server.serve_forever, kwargs=dict(poll_interval=0.05),
                            daemon=True)
  thread.start()
  yield dict(root=root, arrays=arrays, table=table,
             url=f'http://127.0.0.1:{server.server_address[1]}/')
  server.shutdown()
  server.server_close()


def _config(cache, url, source='download'):
  return data_lib.default_data_config(name='mnist', source=source, data_dir=str(cache),
                                      download_url=url, download_timeout=5.0)


def _dead_url():
  """A loopback port nobody listens on."""
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  return f'http://127.0.0.1:{port}/'


def test_download_is_checked_cached_and_parsed(tmp_path, mirror):
  cache = tmp_path / 'cache'
  cache.mkdir()
  ds = data_lib.load_dataset(_config(cache, mirror['url']))
  arrays = mirror['arrays']
  np.testing.assert_array_equal(
      ds.train_images[..., 0], arrays['train-images-idx3-ubyte.gz'] / np.float32(255))
  np.testing.assert_array_equal(ds.test_labels, arrays['t10k-labels-idx1-ubyte.gz'])
  assert ds.description['source'] == 'download'
  assert ds.description['is_full_mnist'] is False  # 12 / 6 images, not 60,000 / 10,000
  assert ds.description['display_name'] == 'mnist 12 / 6'
  assert ds.description['is_mnist_sample'] is False and ds.description['warning'] is None
  assert sorted(os.listdir(cache)) == sorted(_FILES)
  for filename, (size, sha256) in mirror['table'].items():
    assert download_lib.sha256_of(str(cache / filename)) == sha256

  # Once cached, no network: the same load works with the mirror's files gone, and
  # 'auto' finds the cache before trying any download.
  for filename in _FILES:
    os.remove(mirror['root'] / filename)
  again = data_lib.load_dataset(_config(cache, mirror['url']))
  np.testing.assert_array_equal(again.train_images, ds.train_images)
  auto = data_lib.load_dataset(_config(cache, _dead_url(), source='auto'))
  assert auto.description['source'] == 'idx' and auto.description['location'] == str(cache)


@pytest.mark.parametrize('damage', ['checksum', 'truncated'])
def test_bad_file_is_refused_in_one_line_and_never_cached(tmp_path, mirror, damage):
  bad = 't10k-images-idx3-ubyte.gz'
  path = mirror['root'] / bad
  raw = path.read_bytes()
  if damage == 'checksum':  # same size, one byte changed
    path.write_bytes(raw[:-5] + bytes([raw[-5] ^ 0xFF]) + raw[-4:])
  else:  # the server sends a shorter file
    path.write_bytes(raw[:len(raw) // 2])
  cache = tmp_path / 'cache'
  cache.mkdir()
  with pytest.raises(ValueError) as info:
    data_lib.load_dataset(_config(cache, mirror['url']))
  message = str(info.value)
  assert '\n' not in message and bad in message
  assert ('sha256' if damage == 'checksum' else 'truncated') in message
  # Only verified files are in the cache: no partial file, no damaged one.
  assert bad not in os.listdir(cache)
  assert not [f for f in os.listdir(cache) if '.part' in f]
  for filename in os.listdir(cache):
    assert download_lib.sha256_of(str(cache / filename)) == mirror['table'][filename][1]


def test_a_damaged_file_in_the_cache_is_named_not_overwritten(tmp_path, mirror):
  cache = tmp_path / 'cache'
  cache.mkdir()
  (cache / 'train-labels-idx1-ubyte.gz').write_bytes(b'not mnist')
  with pytest.raises(ValueError, match='train-labels-idx1-ubyte.gz.*delete'):
    data_lib.load_dataset(_config(cache, mirror['url']))
  assert (cache / 'train-labels-idx1-ubyte.gz').read_bytes() == b'not mnist'


def test_auto_downloads_when_the_mirror_answers(tmp_path, mirror):
  cache = tmp_path / 'cache'
  cache.mkdir()
  ds = data_lib.load_dataset(_config(cache, mirror['url'], source='auto'))
  assert ds.description['source'] == 'download'
  assert ds.description['requested_source'] == 'auto'


def test_auto_without_a_server_falls_back_to_the_sample(tmp_path):
  cache = tmp_path / 'cache'
  cache.mkdir()
  ds = data_lib.load_dataset(_config(cache, _dead_url(), source='auto'))
  assert ds.description['source'] == 'offline'
  assert ds.description['is_mnist_sample'] is True and 'NOT FULL MNIST' in ds.description['warning']
  assert ds.description['display_name'] == 'mnist_5k_sample 4,000 / 1,000'
  assert 'download' in ds.description['auto_tried']
  assert os.listdir(cache) == []


def test_a_silent_mirror_is_given_up_on(tmp_path):
  """A server that accepts the connection and never answers (a black hole) costs the
  probe's limit, then counts as unreachable."""
  with socket.socket() as listener:
    listener.bind(('127.0.0.1', 0))
    listener.listen(1)
    url = f'http://127.0.0.1:{listener.getsockname()[1]}/'
    ok, reason = download_lib.reachable('mnist', url, seconds=0.3)
  assert not ok and '127.0.0.1' in reason


def test_published_table_is_tfds_own():
  """The sizes, checksums and mirrors copied into download.py are those the installed
  TFDS publishes for its mnist and fashion_mnist builders."""
  tfds = pytest.importorskip('tensorflow_datasets')
  root = os.path.dirname(tfds.__file__)
  for name in ('mnist', 'fashion_mnist'):
    with open(os.path.join(root, 'url_checksums', f'{name}.txt')) as f:
      rows = [line.split('\t') for line in f.read().splitlines() if line.strip()]
    published = {filename: (int(size), sha256) for url, size, sha256, filename in rows}
    assert published == download_lib.PUBLISHED[name]
    assert {url.rsplit('/', 1)[0] + '/' for url, *_ in rows} == {
        download_lib.TFDS_MIRRORS[name]}


class _Stalling(http.server.BaseHTTPRequestHandler):
  """Announces a whole file, sends half of it, then goes silent (until the test ends)."""
  body = b''
  release = threading.Event()

  def do_GET(self):  # pylint: disable=invalid-name
    self.send_response(200)
    self.send_header('Content-Length', str(len(self.body)))
    self.end_headers()
    self.wfile.write(self.body[:len(self.body) // 2])
    self.wfile.flush()
    self.release.wait(helpers.CEILING)

  def log_message(self, *args):
    pass


def test_a_mirror_that_stalls_mid_file_is_given_up_on_by_the_per_read_timeout(
    tmp_path, mirror):
  """data.download_timeout bounds each read, not only the connection: a mirror that
  stops sending half-way ends the download with one error naming the file, and nothing
  (not even the partial file) is left in the cache."""
  name = min(mirror['table'], key=lambda f: mirror['table'][f][0])
  _Stalling.body = (mirror['root'] / name).read_bytes()
  _Stalling.release.clear()
  server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), _Stalling)
  threading.Thread(target=server.serve_forever, kwargs=dict(poll_interval=0.05),
                   daemon=True).start()
  cache = tmp_path / 'cache'
  try:
    with pytest.raises(ValueError) as err:
      download_lib.download('mnist', str(cache), f'http://127.0.0.1:{server.server_address[1]}/',
                            timeout=0.5)
  finally:
    _Stalling.release.set()
    server.shutdown()
    server.server_close()
  message = str(err.value)
  assert '\n' not in message and 'timed out' in message.lower() and '127.0.0.1' in message
  assert not cache.exists() or not os.listdir(cache)


def test_auto_probes_the_mirror_within_its_documented_budget(tmp_path, monkeypatch):
  """source='auto' asks download.reachable with AUTO_PROBE_SECONDS (3 s, as documented)
  and, when the mirror is a black hole, falls back to the offline sample."""
  assert download_lib.AUTO_PROBE_SECONDS == 3.0
  asked = []
  real = download_lib.reachable

  def spy(name, url, seconds=download_lib.AUTO_PROBE_SECONDS):
    asked.append(seconds)
    return real(name, url, seconds)

  monkeypatch.setattr(download_lib, 'reachable', spy)
  (tmp_path / 'cache').mkdir()
  with socket.socket() as listener:  # accepts connections, never answers
    listener.bind(('127.0.0.1', 0))
    listener.listen(1)
    url = f'http://127.0.0.1:{listener.getsockname()[1]}/'
    ds = data_lib.load_dataset(_config(tmp_path / 'cache', url, source='auto'))
  assert asked == [3.0]
  assert 'download' in ds.description['auto_tried']
  assert ds.description['display_name'] == 'mnist_5k_sample 4,000 / 1,000'
