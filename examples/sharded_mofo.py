"""MoFO on a 2x4 device mesh (FSDP x tensor parallel), on 8 simulated CPU devices.

Run: python examples/sharded_mofo.py
The exact per-block selection runs on sharded leaves with nothing but small all-reduces of
counts; the optimizer state is laid out like the params by mofo_jax.state_shardings.
"""

import os

# Eight CPU devices stand in for accelerators; must be set before jax is imported.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

import mofo_jax  # noqa: E402


def main():
  mesh = jax.make_mesh((2, 4), ("fsdp", "tp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  specs = {
    "w_in": P("fsdp", "tp"),
    "layers": P(None, "fsdp", "tp"),
    "w_out": P("tp", None),
    "b_out": P(),
  }
  shards = jax.tree.map(lambda s: NamedSharding(mesh, s), specs)
  k1, k2, k3, kx = jax.random.split(jax.random.key(0), 4)
  params = {
    "w_in": jax.random.normal(k1, (16, 64)) / 4,
    "layers": jax.random.normal(k2, (3, 64, 64)) / 8,  # a scanned stack of 3 layers
    "w_out": jax.random.normal(k3, (64, 1)) / 8,
    "b_out": jnp.zeros(1),
  }
  params = jax.device_put(params, shards)
  x = jax.random.normal(kx, (256, 16))
  y = jnp.sin(x.sum(axis=1, keepdims=True))

  def loss_fn(p):
    h = jnp.tanh(x @ p["w_in"])
    h, _ = jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), h, p["layers"])
    return jnp.mean((h @ p["w_out"] + p["b_out"] - y) ** 2)

  # One block per layer of the stack (BlockSpec(split_axes=(0,))), as if the layers were separate.
  opt = mofo_jax.mofo(
    1e-2,
    fraction=0.1,
    partition=lambda p: jax.tree.map(
      lambda w: mofo_jax.BlockSpec(split_axes=(0,)) if w.ndim == 3 else mofo_jax.BlockSpec(), p
    ),
  )
  abstract = jax.tree.map(
    lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), params
  )
  state_sh = mofo_jax.state_shardings(opt, abstract)
  state = jax.jit(opt.init, out_shardings=state_sh)(params)

  def train_step(p, s):
    loss, g = jax.value_and_grad(loss_fn)(p)
    u, s = opt.update(g, s, p)
    return optax.apply_updates(p, u), s, loss

  train_step = jax.jit(
    train_step,
    in_shardings=(shards, state_sh),
    out_shardings=(shards, state_sh, None),
    donate_argnums=(0, 1),
  )
  for i in range(101):
    params, state, loss = train_step(params, state)
    if i % 25 == 0:
      print(
        f"step {i:3d}  loss {float(loss):.4f}  "
        f"updated {mofo_jax.telemetry_summary(state)['fraction_updated']:.3f}"
      )
  print(
    "layers sharded as",
    params["layers"].sharding.spec,
    "| first moment as",
    state[0].mu["layers"].sharding.spec,
  )


if __name__ == "__main__":
  main()
