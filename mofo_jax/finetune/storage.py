"""Run directories on a local disk or in cloud storage (``gs://...``), through ``etils.epath``.

A local path and a ``gs://`` URL go through the same calls; what differs is how a write is made
atomic. On a local disk a file is written beside its target and renamed over it. A GCS object is
replaced atomically by each upload, but a directory cannot be renamed in one step, so a
directory is uploaded file by file with its marker file (the one a reader looks for first) last.
Checkpoint steps are orbax's business: on GCS it marks a finished step with a commit file.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import fsspec.config
from etils import epath

# URL schemes that name cloud storage rather than a local path.
_REMOTE = ("gs://",)

# gcsfs caches directory listings per process; a run directory also changes under other writers
# (tensorstore inside this process, the other processes of a multi-host run), so a cached
# listing can miss a file that exists. Listings are few (a handful per checkpoint): no cache.
fsspec.config.conf.setdefault("gcs", {}).setdefault("use_listings_cache", False)


def is_remote(path: str | os.PathLike) -> bool:
  """Whether ``path`` is a cloud storage URL (``gs://bucket/...``) rather than a local path."""
  return os.fspath(path).startswith(_REMOTE)


class MissingClient(ValueError):
  """A ``gs://`` path was given, but the GCS client (the ``gcs`` extra: gcsfs) is not installed."""


def require_client(path: str | os.PathLike) -> None:
  """Raises :class:`MissingClient` naming the extra when ``path`` is a ``gs://`` URL that this
  installation cannot open (etils.epath would fail later, with an ImportError traceback)."""
  if not is_remote(path):
    return
  try:
    import gcsfs  # noqa: F401
  except ImportError:
    raise MissingClient(
      f"{os.fspath(path)}: gs:// paths need the GCS client: pip install 'mofo-jax[gcs]'"
    ) from None


def resolve(path: str | os.PathLike) -> str:
  """``path`` as the absolute string a run config records: ``~`` expanded, URLs kept.

  Example:
    >>> resolve("gs://bkt/run/")
    'gs://bkt/run'
    >>> resolve("/tmp/x/../y")
    '/tmp/x/../y'
  """
  if is_remote(path):
    return os.fspath(epath.Path(path))
  return str(Path(path).expanduser().absolute())


def as_path(path: str | os.PathLike) -> epath.Path:
  """An ``epath.Path`` for a local path (made absolute) or a ``gs://`` URL."""
  return epath.Path(resolve(path))


def overlap(a: str | os.PathLike, b: str | os.PathLike) -> bool:
  """Whether one of two directories is, or is inside, the other (symlinks followed locally)."""
  if is_remote(a) != is_remote(b):
    return False
  if is_remote(a):
    pa, pb = (Path(os.fspath(epath.Path(p)).removeprefix("gs://")) for p in (a, b))
  else:
    pa, pb = Path(a).resolve(), Path(b).resolve()
  return pa == pb or pa in pb.parents or pb in pa.parents


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
  """Writes ``obj`` as indented JSON to ``path``, never leaving a half-written file.

  Locally through a temporary file and a rename; on GCS in one upload (which replaces the
  object atomically).
  """
  text = json.dumps(obj, indent=2) + "\n"
  if is_remote(path):
    epath.Path(path).write_text(text)
    return
  path = Path(path)
  tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
  tmp.write_text(text)
  os.replace(tmp, path)


def upload_dir(local: str | os.PathLike, target: str | os.PathLike, last: str) -> None:
  """Copies the files of a flat local directory to ``target`` (a URL), ``last`` the last one.

  A reader that opens ``last`` first (a model's ``config.json``) never sees a half-copied
  directory as complete; files ``target`` held beforehand and the new one lacks are removed
  first (after ``last``, so that the old directory stops looking complete before it changes).
  """
  local, target = Path(local), epath.Path(target)
  names = sorted(p.name for p in local.iterdir())
  if last not in names:
    raise ValueError(f"{local} has no {last}")
  if target.exists():
    (target / last).unlink(missing_ok=True)
    for old in target.iterdir():
      if old.name not in names:
        old.rmtree() if old.is_dir() else old.unlink()
  for name in [n for n in names if n != last] + [last]:
    # Streamed: an 8B model's safetensors file does not fit in host memory twice.
    with (local / name).open("rb") as src, (target / name).open("wb") as dst:
      shutil.copyfileobj(src, dst, 64 << 20)


class LineLog:
  """A JSONL file written line by line, such that a crash keeps what was synced.

  Locally every line is flushed as it is written. A GCS object cannot be appended to, so the
  lines are kept in memory and the whole object is rewritten on :meth:`sync` and
  :meth:`close`: call ``sync`` before each checkpoint, so that the lines up to a saved step are
  never lost.

  Args:
    path: the file (local path or ``gs://`` URL); replaced.
    lines: lines to start it with (each without its newline).
  """

  def __init__(self, path: str | os.PathLike, lines: list[str] = ()):
    self._remote = is_remote(path)
    self._path = epath.Path(path)
    self._lines = list(lines)
    self._file = None if self._remote else open(path, "w")  # noqa: SIM115
    if self._file:
      self._file.writelines(x + "\n" for x in self._lines)
      self._file.flush()
    else:
      self.sync()

  def write(self, line: str) -> None:
    """Appends one line."""
    if self._file:
      self._file.write(line + "\n")
      self._file.flush()
    else:
      self._lines.append(line)

  def sync(self) -> None:
    """Makes every line written so far durable."""
    if self._remote:
      self._path.write_text("".join(x + "\n" for x in self._lines))

  def close(self) -> None:
    """Syncs and closes."""
    if self._file:
      self._file.close()
    else:
      self.sync()


def read_lines(path: str | os.PathLike) -> list[str]:
  """The non-empty lines of a text file, or [] when there is none."""
  p = epath.Path(path)
  if not p.exists():
    return []
  return [x for x in p.read_text().splitlines() if x.strip()]
