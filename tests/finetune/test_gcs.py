"""The GCS emulator fixture, and run checkpoints on ``gs://`` behaving as on a local disk."""

import jax.numpy as jnp
import numpy as np
import tensorstore as ts

# Imported before any gs:// path is used: it turns off gcsfs's listing cache.
from mofo_jax.finetune import storage


def test_emulator_serves_epath_tensorstore_and_orbax(gcs_dir):
  import orbax.checkpoint as ocp

  (gcs_dir / "a").mkdir(parents=True)
  (gcs_dir / "a" / "x.txt").write_text("hi")
  assert [p.name for p in (gcs_dir / "a").iterdir()] == ["x.txt"]
  bucket, _, prefix = str(gcs_dir).removeprefix("gs://").partition("/")
  spec = {"driver": "zarr", "kvstore": {"driver": "gcs", "bucket": bucket, "path": f"{prefix}/z/"}}
  arr = ts.open(spec, create=True, dtype=ts.float32, shape=[3]).result()
  arr.write([1, 2, 3]).result()
  np.testing.assert_array_equal(ts.open(spec).result().read().result(), [1, 2, 3])
  # The array's files went to the emulator, where epath (gcsfs) sees them.
  assert (gcs_dir / "z" / ".zarray").exists()
  with ocp.StandardCheckpointer() as ck:
    ck.save(gcs_dir / "ck", {"w": jnp.arange(3.0)})
  with ocp.StandardCheckpointer() as ck:
    back = ck.restore(gcs_dir / "ck", {"w": jnp.zeros(3)})
  np.testing.assert_array_equal(back["w"], [0, 1, 2])


def test_a_file_written_behind_gcsfs_back_is_seen(gcs_dir):
  """No stale listing: tensorstore (or another host) writes files that gcsfs did not."""
  (gcs_dir / "a").write_text("x")
  assert [p.name for p in gcs_dir.iterdir()] == ["a"]
  bucket, _, prefix = str(gcs_dir).removeprefix("gs://").partition("/")
  kv = ts.KvStore.open({"driver": "gcs", "bucket": bucket, "path": f"{prefix}/"}).result()
  kv.write(b"b", b"y").result()
  assert (gcs_dir / "b").exists() and storage.read_lines(gcs_dir / "b") == ["y"]
  assert sorted(p.name for p in gcs_dir.iterdir()) == ["a", "b"]
