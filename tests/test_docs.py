"""The README and docs quote committed results; these tests keep the quotes true.

* The README's Figure 1 tables against `experiments/results/figure1.json` and
  `figure1_fashion_mnist.json`, number by number, to the precision shown.
* The README's wall times against `experiments/results/timings.md`.
* Every table preceded by `<!-- from PATH -->` (README, docs/, results files) against
  the tables of PATH: each row must be a row of PATH, restricted to the quoting table's
  columns.
* Every relative link and image resolves, anchors included.
* The README's two set-up commands are the ones `.ci/run` and the main job run.
"""

from __future__ import annotations

import json
import pathlib
import re
from typing import Iterator, NamedTuple, Optional

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
RESULTS = REPO / 'experiments' / 'results'
README = REPO / 'README.md'

# Pages that other branches add. A link to one of these may dangle until it lands; once
# it exists it must leave this set (test_pending_docs_are_still_missing says so).
PENDING_DOCS = frozenset()

_MARKER = re.compile(r'<!--\s*from\s+(\S+)\s*-->')
_LINK = re.compile(r'!?\[[^\]]*\]\(([^)\s]+)\)')
# A number as written in the docs: optional sign, thousands commas, decimals.
_NUMBER = re.compile(r'-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?')


def doc_files() -> list[pathlib.Path]:
  return [README, *sorted((REPO / 'docs').glob('*.md')), *sorted(RESULTS.glob('*.md'))]


class Table(NamedTuple):
  header: list[str]
  rows: list[list[str]]
  source: Optional[str]  # PATH (from the repository root) of a `<!-- from PATH -->` just above
  line: int


def split_row(line: str) -> list[str]:
  """Cells of a Markdown table row; `\\|` is a literal bar inside a cell."""
  s = line.strip()
  s = s[1:] if s.startswith('|') else s
  s = s[:-1] if s.endswith('|') and not s.endswith('\\|') else s
  return [c.strip() for c in re.split(r'(?<!\\)\|', s)]


def tables(text: str) -> Iterator[Table]:
  lines = text.splitlines()
  i = 0
  while i < len(lines):
    is_table = (lines[i].lstrip().startswith('|') and i + 1 < len(lines)
                and re.fullmatch(r'\s*\|[\s:|-]+\|\s*', lines[i + 1]))
    if not is_table:
      i += 1
      continue
    j = i - 1
    while j >= 0 and not lines[j].strip():
      j -= 1
    marker = _MARKER.fullmatch(lines[j].strip()) if j >= 0 else None
    rows, k = [], i + 2
    while k < len(lines) and lines[k].lstrip().startswith('|'):
      rows.append(split_row(lines[k]))
      k += 1
    yield Table(split_row(lines[i]), rows, marker.group(1) if marker else None, i + 1)
    i = k


def norm_cell(cell: str) -> str:
  return ' '.join(cell.replace('**', '').replace('\\|', '|').split())


def numbers(text: str) -> list[tuple[float, int]]:
  """(value, decimals shown) of every number in `text`."""
  out = []
  for m in _NUMBER.finditer(text):
    s = m.group(0).replace(',', '')
    out.append((float(s), len(s.split('.')[1]) if '.' in s else 0))
  return out


def assert_shown(shown: tuple[float, int], value: float, what: str) -> None:
  """`shown` (value, decimals) is `value` rounded to the decimals shown."""
  x, decimals = shown
  assert abs(x - value) <= 0.5 * 10.0 ** -decimals + 1e-9, (
      f'{what}: the docs show {x}, the results file has {value}')


def find_table(path: pathlib.Path, first_header: str) -> Table:
  found = [t for t in tables(path.read_text()) if norm_cell(t.header[0]) == first_header]
  assert found, f'{path.name}: no table whose first column is {first_header!r}'
  return found[0]


def load(name: str) -> dict:
  return json.loads((RESULTS / name).read_text())


# ---------------------------------------------------------------- Figure 1

NETWORK_ROWS = {'with BN': 'bn', 'without BN': 'baseline'}
FIGURE1_FILES = {'figure1.md': 'figure1.json',
                 'figure1_fashion_mnist.md': 'figure1_fashion_mnist.json'}


def check_figure1_table(table: Table, result: dict, where: str) -> None:
  header = [norm_cell(h) for h in table.header]
  assert_shown(numbers(header[3])[-1], result['baseline']['max_test_accuracy'],
               f"{where}: the baseline's max in the header")
  percentile_steps = {i: int(numbers(h)[-1][0]) for i, h in enumerate(header)
                      if h.startswith('p15 / p50 / p85')}
  assert len(percentile_steps) >= 2, f'{where}: no percentile columns in {header}'
  seen = set()
  for row in table.rows:
    cells = [norm_cell(c) for c in row]
    net = NETWORK_ROWS[cells[0]]
    seen.add(net)
    r = result[net]
    assert_shown(numbers(cells[1])[0], r['final_test_accuracy'], f'{where}: {net} final')
    assert_shown(numbers(cells[2])[0], r['max_test_accuracy'], f'{where}: {net} max')
    if r['steps_to_baseline_max'] is None:
      assert cells[3] == 'never', f'{where}: {net} never reaches the target'
    else:
      assert_shown(numbers(cells[3])[0], r['steps_to_baseline_max'], f'{where}: {net} steps')
    at = {p[0]: p[1:] for p in r['percentiles']}
    for col, step in percentile_steps.items():
      shown = numbers(cells[col])
      assert len(shown) == 3, f'{where}: {net} at step {step}: {cells[col]!r}'
      for s, v, q in zip(shown, at[step], ('p15', 'p50', 'p85')):
        assert_shown(s, v, f'{where}: {net} {q} at step {step}')
  assert seen == set(NETWORK_ROWS.values()), f'{where}: rows {seen}'


def check_claim_cell(cell: str, claim: dict, where: str) -> None:
  """A cell 'holds: 1,500 vs 35,000' (or 'does not hold: ...') against one claim."""
  cell = norm_cell(cell)
  verdict = 'holds' if claim['holds'] else 'does not hold'
  assert cell.startswith(verdict), f'{where}: {cell!r}, the results say {verdict!r}'
  shown = numbers(cell[len(verdict):])
  recorded = [v for v, _ in numbers(claim['numbers'].split(':', 1)[1])]
  assert len(shown) == len(recorded), f'{where}: {cell!r} vs {claim["numbers"]!r}'
  for s, v in zip(shown, recorded):
    assert_shown(s, v, f'{where}: {claim["claim"]!r}')


def test_readme_figure1_table_matches_json():
  table = find_table(README, 'network')
  check_figure1_table(table, load('figure1.json'), 'README Figure 1 table')


def test_readme_claims_table_matches_json():
  table = find_table(README, "the paper's claim")
  columns = {}
  for i, h in enumerate(table.header):
    if 'MNIST sample' in h:
      columns[i] = 'figure1.json'
    elif 'Fashion-MNIST' in h:
      columns[i] = 'figure1_fashion_mnist.json'
  assert sorted(columns.values()) == sorted(FIGURE1_FILES.values()), table.header
  for col, name in columns.items():
    claims = load(name)['claims']
    assert len(table.rows) == len(claims), f'README claims table: {len(table.rows)} rows'
    for row, claim in zip(table.rows, claims):
      check_claim_cell(row[col], claim, f'README claims table, {name}')


@pytest.mark.parametrize('md, js', sorted(FIGURE1_FILES.items()))
def test_figure1_results_md_matches_json(md, js):
  result = load(js)
  check_figure1_table(find_table(RESULTS / md, 'network'), result, md)
  table = find_table(RESULTS / md, "the paper's claim")
  assert len(table.rows) == len(result['claims'])
  for row, claim in zip(table.rows, result['claims']):
    assert norm_cell(row[0]) == claim['claim'], f'{md}: claim {row[0]!r}'
    check_claim_cell(f'{row[1]}: {row[2]}', claim, md)


# ---------------------------------------------------------------- wall times

def test_readme_wall_times_are_the_results_files():
  timings = {norm_cell(r[0]): r for r in find_table(RESULTS / 'timings.md', 'what').rows}
  readme = README.read_text()
  for label, row_name in (('the main job', 'main job (Figure 1), empty compilation cache'),
                          ('the tests', 'tests'),
                          ('the fast tests', "fast tests (`-m 'not slow'`)")):
    quoted = re.findall(re.escape(label) + r' \*\*([^*]+)\*\*', readme)
    assert len(quoted) == 1, f'README: quote {label!r} once as "{label} **<time>**"'
    wall, date = norm_cell(timings[row_name][1]), norm_cell(timings[row_name][3])
    assert quoted[0] == wall, f'README: {label} {quoted[0]!r}, timings.md: {wall!r}'
    assert date in readme, f'README: the date of {label!r} ({date}) is missing'


# ---------------------------------------------------------------- quoted tables

def quoted_tables() -> list[tuple[str, Table]]:
  return [(f'{p.relative_to(REPO)}:{t.line}', t)
          for p in doc_files() for t in tables(p.read_text()) if t.source]


def test_some_tables_are_quoted():
  assert len(quoted_tables()) >= 10


@pytest.mark.parametrize('where, table', quoted_tables(),
                         ids=[where for where, _ in quoted_tables()])
def test_quoted_table_rows_are_in_the_source(where, table):
  source = REPO / table.source  # marker paths are relative to the repository root
  assert source.is_file(), f'{where}: no such file {table.source}'
  header = [norm_cell(h) for h in table.header]
  candidates = set()
  for t in tables(source.read_text()):
    src_header = [norm_cell(h) for h in t.header]
    if all(h in src_header for h in header):
      cols = [src_header.index(h) for h in header]
      candidates |= {tuple(norm_cell(r[c]) if c < len(r) else '' for c in cols)
                     for r in t.rows}
  assert candidates, f'{where}: {source.name} has no table with the columns {header}'
  for row in table.rows:
    assert tuple(norm_cell(c) for c in row) in candidates, (
        f'{where}: row {row} is not in {source.name}')


# ---------------------------------------------------------------- links

def slug(heading: str) -> str:
  """GitHub's anchor for a heading."""
  s = re.sub(r'[^\w\- ]', '', heading.strip().lower())
  return s.replace(' ', '-')


def anchors(path: pathlib.Path) -> set[str]:
  text = re.sub(r'```.*?```', '', path.read_text(), flags=re.S)
  return {slug(m.group(1)) for m in re.finditer(r'^#+\s+(.*)$', text, flags=re.M)}


def links() -> list[tuple[str, str]]:
  out = []
  for p in doc_files():
    text = re.sub(r'```.*?```', '', p.read_text(), flags=re.S)
    out += [(str(p.relative_to(REPO)), m.group(1)) for m in _LINK.finditer(text)
            if not re.match(r'[a-z]+:', m.group(1))]
  return out


def test_docs_have_links():
  assert len(links()) >= 30


@pytest.mark.parametrize('doc, target', links())
def test_relative_link_resolves(doc, target):
  path_part, _, anchor = target.partition('#')
  base = REPO / doc
  path = (base.parent / path_part).resolve() if path_part else base
  rel = path.relative_to(REPO).as_posix() if path.is_relative_to(REPO) else str(path)
  if rel in PENDING_DOCS and not path.exists():
    return
  assert path.exists(), f'{doc}: link to {target!r}, no such file {rel}'
  if anchor:
    assert path.suffix == '.md', f'{doc}: anchor into {rel}, which is not Markdown'
    assert anchor in anchors(path), f'{doc}: {target!r}: {rel} has no heading #{anchor}'


def test_pending_docs_are_still_missing():
  landed = sorted(d for d in PENDING_DOCS if (REPO / d).exists())
  assert not landed, f'{landed} exist now: remove them from PENDING_DOCS in tests/test_docs.py'


# ---------------------------------------------------------------- set-up commands

def test_readme_setup_commands_are_the_ci_and_main_job_commands():
  blocks = re.findall(r'```bash\n(.*?)```', README.read_text(), flags=re.S)
  setup = blocks[0].splitlines()
  ci = [line.strip() for line in (REPO / '.ci' / 'run').read_text().splitlines()
        if line.strip().startswith('python -m pytest')]
  assert len(ci) == 1 and ci[0] in setup, f'README set-up block must hold {ci}'
  main_job = [line for line in setup if 'experiments.mnist_figure1' in line]
  assert len(main_job) == 1 and main_job[0].startswith('python3 -m venv .venv && ')
  assert 'pip install -r requirements.txt' in main_job[0]


# ---------------------------------------------------------------- results md from JSON

def cells_by_column(path: pathlib.Path, first_header: str) -> dict[str, dict[str, str]]:
  """{first cell: {header: cell}} of the table whose first column is `first_header`."""
  table = find_table(path, first_header)
  header = [norm_cell(h) for h in table.header]
  return {norm_cell(r[0]): dict(zip(header, map(norm_cell, r))) for r in table.rows}


def assert_numbers(cell: str, values: list[float], where: str) -> None:
  shown = numbers(cell)
  assert len(shown) == len(values), f'{where}: {cell!r} vs {values}'
  for s, v in zip(shown, values):
    assert_shown(s, v, where)


def test_why_bn_md_matches_json():
  result = load('why_bn.json')
  rows = cells_by_column(RESULTS / 'why_bn.md', 'network')
  layers = ('hidden_1', 'hidden_2', 'logits')
  columns = {'ICS l2 hidden_1 / hidden_2 / logits': 'mean_ics_l2',
             'ICS relative, same layers': 'mean_ics_rel',
             'ICS cosine, same layers': 'mean_ics_cos'}
  for label, key in (('BN', 'bn'), ('noisy BN', 'noisy_bn'), ('no BN', 'baseline')):
    r, row = result[key], rows[label]
    assert_numbers(row['steps'], [r['eval_accuracy'][-1][0]], f'why_bn.md {label} steps')
    assert_numbers(row['final test acc'], [r['final_eval_accuracy']], f'why_bn.md {label}')
    for column, mean_key in columns.items():
      assert_numbers(row[column], [r[mean_key][layer] for layer in layers],
                     f'why_bn.md {label} {column}')
    assert_numbers(row['loss range along -g'], [r['mean_landscape_loss_range']],
                   f'why_bn.md {label} loss range')
    assert_numbers(row['gradient predictiveness'], [r['mean_landscape_grad_pred']],
                   f'why_bn.md {label} gradient predictiveness')
    assert_numbers(row['beta-smoothness'], [r['mean_landscape_beta']],
                   f'why_bn.md {label} beta')


def test_conv_bn_regularization_md_matches_json():
  result = load('conv_bn_regularization.json')
  rows = cells_by_column(RESULTS / 'conv_bn_regularization.md', 'network')
  for label, key in (('BN', 'bn'), ('no BN', 'baseline')):
    r, row, where = result[key], rows[label], f'conv_bn_regularization.md {label}'
    assert_numbers(row['final val acc'], [r['final_val_accuracy']], where)
    assert_numbers(row['best val acc'], [r['best_val_accuracy']], where)
    assert_numbers(row['min val loss (epoch)'], [r['min_val_loss'], r['epoch_of_min_val_loss']],
                   where)
    assert_numbers(row['final val loss'], [r['final_val_loss']], where)
    assert_numbers(row['rise after min'], [100 * r['val_loss_rise_after_min']], where)
    assert_numbers(row['final train acc'], [r['train_accuracy'][-1][1]], where)
    assert_numbers(row['final train loss'], [r['final_train_loss']], where)


def test_input_normalization_md_matches_json():
  result = load('input_normalization.json')
  path = RESULTS / 'input_normalization.md'
  quadratic = result['quadratic']
  bowls = cells_by_column(path, 'bowl')
  for label, key in (('x²/20 + y² (elongated)', 'elongated'), ('x² + y² (round)', 'round')):
    row, bowl = bowls[label], quadratic[key]
    assert_numbers(row['curvatures'], bowl['curvatures'], f'{label} curvatures')
    assert_numbers(row['contraction per step'], bowl['contraction_per_step'], label)
    assert_numbers(row['steps to |x|, |y| < 0.01'], [bowl['steps_to_tol']], label)
  mlp = result['mlp']
  variance = mlp['target_mse'] / mlp['target_relative_mse']
  per_lr = find_table(path, 'inputs')
  best = [t for t in tables(path.read_text()) if norm_cell(t.header[1]) == 'best lr']
  assert len(best) == 1, 'input_normalization.md: one table of best rates'
  best_rows = {norm_cell(r[0]): r for r in best[0].rows}
  for row in per_lr.rows:
    key = {'raw': 'unnormalised', 'standardised': 'normalised'}[norm_cell(row[0])]
    run = mlp[key]
    assert [float(h) for h in per_lr.header[1:]] == mlp['lrs'], per_lr.header
    for cell, steps, diverged in zip(row[1:], run['steps_to_target'], run['diverged']):
      expected = 'diverged' if diverged else '-' if steps is None else f'{steps:,}'
      assert norm_cell(cell) == expected, f'input_normalization.md {key}: {cell!r}'
    b = best_rows[norm_cell(row[0])]
    assert_numbers(b[1], [run['best_lr']], f'{key} best lr')
    assert_numbers(b[2], [run['best_steps_to_target']], f'{key} steps')
    assert_numbers(b[3], [run['best_final_mse'] / variance], f'{key} final MSE')
