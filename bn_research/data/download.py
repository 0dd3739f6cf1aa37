"""Full MNIST / Fashion-MNIST from the mirror TFDS uses, checked and cached as IDX files.

The four gzip'd IDX files of each dataset are fetched from the URLs in TFDS's own
builders (`tensorflow_datasets/image_classification/mnist.py`) and checked against the
sizes and sha256 sums TFDS publishes for them (`tensorflow_datasets/url_checksums/
mnist.txt` and `fashion_mnist.txt`, TFDS 4.9.10), copied into `PUBLISHED` below so that
no TFDS import is needed (tests/test_data.py compares the copy with the installed TFDS).

Each file is written under a temporary name and renamed into the cache only after its
size and sha256 match, so the cache never holds a partial or corrupt file; a file
already in the cache is verified the same way before it is used. The cache is
`data.data_dir` when set, else `default_cache_dir(name)`. Reading the cached files is
`idx.load_idx_dir`'s job: there is one IDX reader.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import threading
import urllib.parse
import urllib.request
from typing import Dict, List, Tuple

# The mirror TFDS downloads each dataset from (its builders' `URL`).
TFDS_MIRRORS = {
    'mnist': 'https://storage.googleapis.com/cvdf-datasets/mnist/',
    'fashion_mnist': 'http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/',
}
# file name -> (size in bytes, sha256), as TFDS publishes them.
PUBLISHED: Dict[str, Dict[str, Tuple[int, str]]] = {
    'mnist': {
        'train-images-idx3-ubyte.gz': (
            9912422, '440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609'),
        'train-labels-idx1-ubyte.gz': (
            28881, '3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c'),
        't10k-images-idx3-ubyte.gz': (
            1648877, '8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6'),
        't10k-labels-idx1-ubyte.gz': (
            4542, 'f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6'),
    },
    'fashion_mnist': {
        'train-images-idx3-ubyte.gz': (
            26421880, '3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84'),
        'train-labels-idx1-ubyte.gz': (
            29515, 'a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845'),
        't10k-images-idx3-ubyte.gz': (
            4422102, '346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073'),
        't10k-labels-idx1-ubyte.gz': (
            5148, '67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5'),
    },
}
# data.source='auto' gives the mirror this long to answer before it falls back to the
# offline sample: long enough for a healthy server far away, short enough that an
# offline machine does not notice.
AUTO_PROBE_SECONDS = 3.0
_CHUNK = 1 << 16


def default_cache_dir(name: str) -> str:
  """$XDG_CACHE_HOME/bn_research/<name>, else ~/.cache/bn_research/<name>."""
  base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  return os.path.join(base, 'bn_research', name)


def mirror_url(name: str, download_url: str) -> str:
  """The base URL the files are fetched from: `download_url`, or TFDS's mirror when ''."""
  url = download_url or TFDS_MIRRORS[name]
  return url if url.endswith('/') else url + '/'


def sha256_of(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
      digest.update(chunk)
  return digest.hexdigest()


def _delete_hint(path: str) -> str:
  return f'delete {path} to download it again'


def verify_cached(name: str, directory: str) -> List[str]:
  """Checks the cached files of `name` in `directory`.

  Returns:
    The names of the files not there yet (empty when all four are cached and
    verified).

  Raises:
    ValueError: naming a file that is there but whose size or sha256 is not the
      published one (never overwritten: it may be someone's own file).
  """
  missing = []
  for filename, (size, sha256) in PUBLISHED[name].items():
    path = os.path.join(directory, filename)
    if not os.path.exists(path):
      missing.append(filename)
      continue
    actual = os.path.getsize(path)
    if actual != size:
      raise ValueError(f'{path}: {actual} bytes, but the published {name} file has {size} '
                       f'(truncated or not {name}); {_delete_hint(path)}.')
    if sha256_of(path) != sha256:
      raise ValueError(f'{path}: its sha256 is not the published one for {name}; '
                       f'{_delete_hint(path)}.')
  return missing


def _fetch(url: str, dest: str, size: int, sha256: str, timeout: float) -> None:
  """Downloads `url` to `dest` through a temporary file renamed only once verified."""
  filename = os.path.basename(dest)
  part = f'{dest}.part-{os.getpid()}'
  try:
    digest, received = hashlib.sha256(), 0
    with urllib.request.urlopen(url, timeout=timeout) as response, open(part, 'wb') as f:
      for chunk in iter(lambda: response.read(_CHUNK), b''):
        received += len(chunk)
        if received > size:
          break  # a wrong file: no need to read the rest
        digest.update(chunk)
        f.write(chunk)
    if received != size:
      got = (f'more than the published {size} bytes (wrong file)' if received > size
             else f'{received} of the published {size} bytes (truncated)')
      raise ValueError(f'{filename} from {url}: received {got}; nothing was cached. Retry, '
                       'or set data.download_url to another mirror.')
    if digest.hexdigest() != sha256:
      raise ValueError(
          f'{filename} from {url}: sha256 {digest.hexdigest()[:16]}... does not match the '
          f'published {sha256[:16]}... (corrupt or altered file); nothing was cached. '
          'Retry, or set data.download_url to another mirror.')
    os.replace(part, dest)
  except (OSError, http.client.HTTPException) as e:
    reason = getattr(e, 'reason', None) or e
    raise ValueError(f'{filename}: downloading {url} failed ({type(e).__name__}: '
                     f'{str(reason).splitlines()[0] if str(reason) else "no detail"}); '
                     'nothing was cached. Check the network, set data.download_url to a '
                     "mirror, or use data.source='offline'.") from None
  finally:
    if os.path.exists(part):
      os.remove(part)


def reachable(name: str, download_url: str, seconds: float = AUTO_PROBE_SECONDS) -> Tuple[bool, str]:
  """Whether the mirror answers for the smallest file within `seconds` in all.

  Name resolution, connecting and the response headers all count against the limit
  (the attempt runs in a daemon thread that is abandoned when time is up), so an
  offline machine, a refused port or a black-holed route all cost at most `seconds`.

  Returns:
    (ok, reason): reason says why not when ok is False.
  """
  filename = min(PUBLISHED[name], key=lambda f: PUBLISHED[name][f][0])
  url = urllib.parse.urljoin(mirror_url(name, download_url), filename)
  result = {}

  def attempt():
    try:
      with urllib.request.urlopen(url, timeout=seconds) as response:
        result['status'] = response.status
    except Exception as e:  # pylint: disable=broad-except
      result['error'] = f'{type(e).__name__}: {getattr(e, "reason", None) or e}'

  thread = threading.Thread(target=attempt, daemon=True, name='mirror-probe')
  thread.start()
  thread.join(seconds)
  if 'status' in result:
    return True, f'{url} answered'
  return False, f'{url}: {result.get("error", f"no answer within {seconds:g} s")}'


def download(name: str, directory: str, download_url: str, timeout: float) -> str:
  """Makes `directory` hold the four verified IDX files of `name`; returns it.

  Files already cached and verified are not fetched again.

  Args:
    name: 'mnist' or 'fashion_mnist'.
    directory: the cache; created if needed.
    download_url: base URL of a mirror; '' = the one TFDS uses.
    timeout: seconds any one network operation (connect, one read) may take.

  Raises:
    ValueError: one line naming the file, for a network failure, a size or
      checksum mismatch, or an unusable cache directory.
  """
  created = not os.path.isdir(directory)
  try:
    os.makedirs(directory, exist_ok=True)
  except OSError as e:
    raise ValueError(f'cannot create the MNIST cache {directory!r} ({e.strerror}); '
                     'set data.data_dir to a writable directory.') from None
  if not os.access(directory, os.W_OK):
    missing = verify_cached(name, directory)
    if missing:
      raise ValueError(f'the {name} cache {directory!r} is not writable; set data.data_dir '
                       'to a writable directory.')
    return directory
  base = mirror_url(name, download_url)
  try:
    for filename in verify_cached(name, directory):
      size, sha256 = PUBLISHED[name][filename]
      _fetch(urllib.parse.urljoin(base, filename), os.path.join(directory, filename),
             size, sha256, timeout)
  except ValueError:
    if created and not os.listdir(directory):
      os.rmdir(directory)  # an offline attempt leaves no empty cache behind
    raise
  return directory
