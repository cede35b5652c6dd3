"""Gradient accumulation in the train step against ``optax.MultiSteps``."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxsurv.trainer import optim

# (name, weight decay, b1, b2, momentum, nesterov, clip, accum, proximal mu)
SPECS = [("sgd", 1e-3, 0.9, 0.999, 0.9, True, 0.0, 3, 0.0),
         ("adam", 1e-3, 0.9, 0.999, 0.9, False, 1.0, 4, 0.0),
         ("adamw", 1e-2, 0.9, 0.999, 0.9, False, 0.0, 1, 0.0)]


@pytest.mark.parametrize("spec", SPECS, ids=[s[0] for s in SPECS])
def test_apply_updates_equals_multisteps_then_the_update(spec):
  tx = optim.optimizer_from_spec(spec)
  k = spec[7]
  ref = optax.MultiSteps(tx.inner_opt, every_k_schedule=k) if k > 1 else tx
  params = {"w": jnp.arange(6.0).reshape(2, 3) / 5, "b": jnp.ones(4)}
  lr = jnp.float32(0.1)

  @jax.jit
  def mine(g, s, p):
    return optim.apply_updates(tx, g, s, p, lr)

  @jax.jit
  def theirs(g, s, p):
    u, s = ref.update(g, s, p)
    return jax.tree.map(lambda p, u: p - lr * u, p, u), s

  p1 = p2 = params
  s1, s2 = tx.init(params), ref.init(params)
  assert jax.tree.structure(s1) == jax.tree.structure(s2)  # checkpoints unchanged
  for i in range(2 * max(k, 2) + 1):
    g = jax.tree.map(lambda x, i=i: jax.random.normal(jax.random.key(i), x.shape), params)
    before = p1
    (p1, s1), (p2, s2) = mine(g, s1, p1), theirs(g, s2, p2)
    for a, b in zip(jax.tree.leaves((p1, s1)), jax.tree.leaves((p2, s2))):
      np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    if k > 1 and (i + 1) % k:  # between updates the parameters do not move at all
      for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(before)):
        np.testing.assert_array_equal(a, b)
    else:
      assert any(bool(jnp.any(a != b)) for a, b in
                 zip(jax.tree.leaves(p1), jax.tree.leaves(before)))
  if k > 1:
    assert int(s1.gradient_step) == int(s2.gradient_step) == (2 * max(k, 2) + 1) // k
