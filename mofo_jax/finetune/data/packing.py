"""Packing tokenized examples into fixed-shape batches for next-token training."""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence

import numpy as np

BATCH_KEYS = ("input_ids", "targets", "loss_mask", "segment_ids", "positions")


def pack_examples(
  examples: Sequence[tuple[np.ndarray, np.ndarray]],
  seq_len: int,
  truncate: bool = False,
  pad_id: int = 0,
) -> dict[str, np.ndarray]:
  """Packs examples, in order, into rows of ``seq_len`` positions.

  An example of ``L`` tokens fills ``L - 1`` positions: its inputs are
  tokens ``0..L-2`` and its targets tokens ``1..L-1``, so no target ever
  crosses into the next example and no position is wasted on a token that
  has nothing to predict. Rows are filled greedily in the given order; an
  example that does not fit in the rest of a row starts a new one.

  Args:
    examples: ``(ids, mask)`` pairs (e.g. ``TokenizedExample``), where
      ``mask[i]`` says whether the loss is taken on predicting token ``i``.
    seq_len: positions per row (T).
    truncate: cut examples longer than ``seq_len + 1`` tokens instead of
      raising.
    pad_id: token id written into padding positions (they are masked).

  Returns:
    A dict of int32 arrays of shape [N, T]:
    ``input_ids``; ``targets`` (the next token within the same example);
    ``loss_mask`` (the example's mask on the target token, 0 on padding);
    ``segment_ids`` (1..k for the k examples in a row, 0 on padding);
    ``positions`` (0, 1, ... restarting in every segment, 0 on padding).

  Raises:
    ValueError: if ``examples`` is empty, an example has fewer than 2
      tokens, ids and mask lengths differ, or an example is longer than
      ``seq_len + 1`` tokens and ``truncate`` is off.
  """
  if seq_len < 1:
    raise ValueError(f"seq_len must be positive, got {seq_len}")
  if len(examples) == 0:
    raise ValueError("cannot pack an empty dataset")
  rows: list[dict[str, np.ndarray]] = []
  fill = seq_len  # forces a fresh row for the first example
  for i, (ids, mask) in enumerate(examples):
    ids = np.asarray(ids)
    mask = np.asarray(mask)
    if ids.shape != mask.shape or ids.ndim != 1:
      raise ValueError(
        f"example {i}: ids {ids.shape} and mask {mask.shape} must be 1-D of the same length"
      )
    if len(ids) < 2:
      raise ValueError(f"example {i} has {len(ids)} token(s); next-token training needs at least 2")
    if len(ids) - 1 > seq_len:
      if not truncate:
        raise ValueError(
          f"example {i} has {len(ids)} tokens, which needs seq_len >= "
          f"{len(ids) - 1} (got {seq_len}); raise seq_len or pass truncate=True"
        )
      ids, mask = ids[: seq_len + 1], mask[: seq_len + 1]
    n = len(ids) - 1
    if fill + n > seq_len:
      rows.append({k: np.zeros(seq_len, np.int32) for k in BATCH_KEYS})
      rows[-1]["input_ids"][:] = pad_id
      rows[-1]["targets"][:] = pad_id
      fill = 0
    row = rows[-1]
    span = slice(fill, fill + n)
    row["input_ids"][span] = ids[:-1]
    row["targets"][span] = ids[1:]
    row["loss_mask"][span] = mask[1:] != 0
    row["segment_ids"][span] = row["segment_ids"][fill - 1] + 1 if fill else 1
    row["positions"][span] = np.arange(n)
    fill += n
  return {k: np.stack([r[k] for r in rows]) for k in BATCH_KEYS}


def batch_iterator(
  examples: Sequence[tuple[np.ndarray, np.ndarray]],
  batch_size: int,
  seq_len: int,
  *,
  seed: int = 0,
  num_epochs: int | None = 1,
  shuffle: bool = True,
  drop_remainder: bool = True,
  truncate: bool = False,
  pad_id: int = 0,
  process_index: int = 0,
  process_count: int = 1,
) -> Iterator[dict[str, np.ndarray]]:
  """Yields packed [batch, seq_len] batches, epoch after epoch, deterministically.

  Each epoch shuffles the example order with a generator seeded by
  ``(seed, epoch)`` and then packs; the same seed therefore gives the same
  data order to every run (e.g. two optimizers being compared). The number
  of batches can differ slightly between epochs because packing depends on
  the order.

  Args:
    examples: ``(ids, mask)`` pairs as for ``pack_examples``.
    batch_size: rows per global batch.
    seq_len: positions per row.
    seed: shuffling seed.
    num_epochs: passes over the data; ``None`` repeats forever.
    shuffle: shuffle examples each epoch (otherwise keep their order).
    drop_remainder: drop an epoch's last partial batch; otherwise fill it
      with all-padding rows (loss mask 0) so shapes stay fixed.
    truncate: cut over-long examples instead of raising.
    pad_id: token id for padding positions.
    process_index: this host's index in a multi-host run.
    process_count: number of hosts; each gets its ``batch_size //
      process_count`` rows of every global batch.

  Returns:
    An iterator of dicts with the keys of ``BATCH_KEYS``, int32 arrays of
    shape [batch_size // process_count, seq_len].

  Raises:
    ValueError: for an empty dataset, bad sizes, or (with
      ``drop_remainder``) a dataset too small to fill a single batch.
  """
  if len(examples) == 0:
    raise ValueError("empty dataset: no examples to batch")
  if batch_size < 1 or batch_size % process_count:
    raise ValueError(
      f"batch_size {batch_size} must be positive and divisible by process_count {process_count}"
    )
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count})")

  def rows_for(epoch):
    if not shuffle:
      return pack_examples(examples, seq_len, truncate, pad_id)
    order = np.random.default_rng([seed, epoch]).permutation(len(examples))
    return pack_examples([examples[i] for i in order], seq_len, truncate, pad_id)

  # Pack the first epoch eagerly so bad data fails at the call site rather
  # than at the first next().
  first_rows = rows_for(0)
  if drop_remainder and len(first_rows["input_ids"]) < batch_size:
    raise ValueError(
      f"dataset packs into {len(first_rows['input_ids'])} rows of {seq_len}, "
      f"fewer than batch_size {batch_size}; use drop_remainder=False"
    )
  local = batch_size // process_count
  lo = process_index * local

  def generate():
    epochs = itertools.count() if num_epochs is None else range(num_epochs)
    for epoch in epochs:
      rows = first_rows if epoch == 0 or not shuffle else rows_for(epoch)
      n = len(rows["input_ids"])
      stop = n - n % batch_size if drop_remainder else n
      for start in range(0, stop, batch_size):
        batch = {k: v[start : start + batch_size] for k, v in rows.items()}
        short = batch_size - len(batch["input_ids"])
        if short:
          batch = _pad_rows(batch, short, pad_id)
        yield {k: v[lo : lo + local] for k, v in batch.items()}

  return generate()


def _pad_rows(batch: dict[str, np.ndarray], count: int, pad_id: int) -> dict[str, np.ndarray]:
  """Appends ``count`` all-padding rows to every array of a batch."""
  out = {}
  for k, v in batch.items():
    fill = pad_id if k in ("input_ids", "targets") else 0
    out[k] = np.concatenate([v, np.full((count, v.shape[1]), fill, v.dtype)])
  return out
