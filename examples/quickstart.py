"""Quick start: fit a small MLP with MoFO and watch how much of each weight moves per step.

Run: python examples/quickstart.py
"""

import jax
import jax.numpy as jnp
import optax

import mofo_jax


def init_mlp(key, sizes=(8, 64, 64, 1)):
  keys = jax.random.split(key, len(sizes) - 1)
  return [
    {"w": jax.random.normal(k, (a, b)) / jnp.sqrt(a), "b": jnp.zeros(b)}
    for k, a, b in zip(keys, sizes[:-1], sizes[1:])
  ]


def mlp(params, x):
  for layer in params[:-1]:
    x = jax.nn.gelu(x @ layer["w"] + layer["b"])
  return x @ params[-1]["w"] + params[-1]["b"]


def main():
  kx, kp = jax.random.split(jax.random.key(0))
  x = jax.random.normal(kx, (256, 8))
  y = jnp.sin(x.sum(axis=1, keepdims=True))
  params = init_mlp(kp)

  # MoFO: Adam moments everywhere, but each step moves only the 10% of each weight matrix with
  # the largest momentum; biases (1-D) get dense Adam.
  opt = optax.chain(optax.clip_by_global_norm(1.0), mofo_jax.mofo(3e-3, fraction=0.1))
  state = opt.init(params)

  @jax.jit
  def step(params, state):
    loss, grads = jax.value_and_grad(lambda p: jnp.mean((mlp(p, x) - y) ** 2))(params)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  start = params
  for t in range(1, 301):
    params, state, loss = step(params, state)
    if t == 1 or t % 50 == 0:
      summary = mofo_jax.telemetry_summary(state)
      kernel0 = summary["fraction_updated/[0]['w']"]
      print(
        f"step {t:4d}  loss {float(loss):.4f}  "
        f"updated this step: {summary['num_updated']} of {summary['num_entries']} entries "
        f"({summary['fraction_updated']:.3f}), "
        f"{kernel0:.3f} of layer 0's kernel"
      )
  moved = sum(int((a != b).sum()) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(start)))
  total = sum(a.size for a in jax.tree.leaves(params))
  print(f"after 300 steps, {moved / total:.1%} of the weights have ever moved")


if __name__ == "__main__":
  main()
