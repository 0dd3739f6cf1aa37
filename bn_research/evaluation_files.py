"""The files of an evaluation (`bn_research.evaluate`): where they go, and the record
as JSON and as a Markdown table."""

from __future__ import annotations

import os
from typing import Sequence


def default_out(workdirs: Sequence[str]) -> str:
  """The directory holding the runs (their parents' common directory)."""
  parents = [os.path.dirname(os.path.abspath(w)) for w in workdirs]
  return os.path.commonpath(parents)


def markdown(record: dict) -> str:
  """The record as a Markdown table, one row per run (or ensemble) and crop scheme."""
  k = record['top_k']
  base = os.path.commonpath([os.path.abspath(r['workdir']) for r in record['runs']])
  lines = [f'| run | step | crops | views | top-1 acc | top-{k} acc | top-1 err | '
           f'top-{k} err | NLL | examples |',
           '|---|---:|---|---:|---:|---:|---:|---:|---:|---:|']
  steps = {r['workdir']: r['step'] for r in record['runs']}
  for row in record['rows']:
    name = (row['name'] if row['name'] == 'ensemble'
            else os.path.relpath(os.path.abspath(row['name']), os.path.dirname(base)))
    top1, topk = row['top1_accuracy'], row[f'top{k}_accuracy']
    lines.append(f'| {name} | {steps.get(row["name"], "")} | {row["crops"]} | {row["views"]} '
                 f'| {top1:.4f} | {topk:.4f} | {1 - top1:.2%} | {1 - topk:.2%} | '
                 f'{row["nll"]:.4f} | {row["count"]} |')
  if record.get('ensemble_vs_best_single'):
    lines += ['', f'| crops | best single run | its top-1 err | ensemble top-1 err | '
              f'its top-{k} err | ensemble top-{k} err |', '|---|---|---:|---:|---:|---:|']
    for c in record['ensemble_vs_best_single']:
      name = os.path.relpath(os.path.abspath(c['best_single']), os.path.dirname(base))
      lines.append(f'| {c["crops"]} | {name} | {1 - c["best_single_top1_accuracy"]:.2%} | '
                   f'{1 - c["ensemble_top1_accuracy"]:.2%} | '
                   f'{1 - c[f"best_single_top{k}_accuracy"]:.2%} | '
                   f'{1 - c[f"ensemble_top{k}_accuracy"]:.2%} |')
  stats = sorted({r['batch_stats'] for r in record['runs']})
  if record.get('note'):
    lines += ['', record['note']]
  lines += ['', f'BN statistics at inference: {", ".join(stats)}.',
            f'Command: `{record["command"]}`', f'Date: {record["date"]}; machine: '
            f'{record["machine"]}.']
  return '\n'.join(lines) + '\n'


def write(record: dict, out: str, name: str) -> tuple[str, str]:
  """Writes OUT/NAME.json and OUT/NAME.md (each atomically); returns their paths."""
  from bn_research import rundir  # pylint: disable=g-import-not-at-top
  os.makedirs(out, exist_ok=True)
  json_path, md_path = os.path.join(out, name + '.json'), os.path.join(out, name + '.md')
  rundir.write_json(json_path, record, sort_keys=False)
  tmp = md_path + f'.{os.getpid()}.tmp'
  with open(tmp, 'w') as f:
    f.write(markdown(record))
  os.replace(tmp, md_path)
  return json_path, md_path


def check_out(out: str, name: str) -> None:
  """ValueError unless OUT can hold the results (checked before anything runs)."""
  if not name or os.sep in name or name.startswith('.'):
    raise ValueError(f'--name={name!r}; allowed: a plain file name without .json / .md.')
  if os.path.exists(out) and not os.path.isdir(out):
    raise ValueError(f'--out={out!r} is a file; allowed: a directory (made if missing).')
