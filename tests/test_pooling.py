"""Separable max-pooling against ``flax.linen.max_pool``: values, gradients, ties."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsurv.models.pooling import max_pool, max_pool_separable


@pytest.mark.parametrize("shape,window,strides,padding", [
    ((2, 7, 6, 5, 3), (3, 3, 3), (2, 2, 2), ((1, 1),) * 3),  # the DenseNet stem's pool
    ((1, 5, 6, 7, 2), (2, 3, 2), (1, 2, 3), ((0, 1), (1, 0), (2, 2))),
    ((2, 4, 4, 4, 2), (3, 3, 3), (1, 1, 1), ((1, 1),) * 3),  # overlapping windows
])
def test_values_and_gradients_equal_nn_max_pool_ties_included(shape, window, strides, padding):
  ref = lambda x: nn.max_pool(x, window, strides=strides, padding=padding)
  mine = lambda x: max_pool_separable(x, window, strides, padding)
  x = jax.random.normal(jax.random.key(0), shape)
  tied = jnp.round(0.7 * x)  # values in {-2, ..., 2}: most windows hold tied maxima
  r = jax.random.normal(jax.random.key(1), ref(x).shape)

  @jax.jit
  def outputs_and_grads(v):
    vjps = [jax.vjp(f, v) for f in (mine, ref)]
    # Integer cotangents (ones) make every sum exact: those gradients must agree
    # bit for bit, so each output's cotangent goes to the same (first) maximum.
    return [(y, vjp(jnp.ones_like(r))[0], vjp(r)[0]) for y, vjp in vjps]

  for v in (x, tied):
    (y1, g1, h1), (y2, g2, h2) = outputs_and_grads(v)
    np.testing.assert_array_equal(y1, y2)
    np.testing.assert_array_equal(g1, g2)
    np.testing.assert_allclose(h1, h2, rtol=1e-6, atol=1e-6)
  # The tied case really has ties that a wrong routing would split differently.
  assert int(jnp.sum(jax.grad(lambda v: jnp.sum(ref(v)))(tied) > 0)) < ref(tied).size


def test_dispatch_and_errors():
  x = jax.random.normal(jax.random.key(0), (1, 4, 4, 4, 1))
  args = ((3, 3, 3), (2, 2, 2), ((1, 1),) * 3)
  for impl in ("auto", "native", "separable"):
    np.testing.assert_array_equal(max_pool(x, *args, impl=impl),
                                  nn.max_pool(x, args[0], strides=args[1], padding=args[2]))
  with pytest.raises(ValueError, match="impl must be one of"):
    max_pool(x, *args, impl="fast")
  with pytest.raises(ValueError, match="batch, depth, height, width, channels"):
    max_pool(x[0], *args)
