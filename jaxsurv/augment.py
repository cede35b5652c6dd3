"""On-device 3D augmentation, applied jointly to all channels of a volume.

Random flips, rotations and zoom are composed into one affine map per patient
and applied with a single trilinear resampling (``map_coordinates``), inside
the jitted train step, so the host never touches the volumes. The same map
is used for every channel, so T1c and T2 stay co-registered.

Angles are in degrees. (The MMNN code passes ``range_x=15`` to MONAI's
``RandRotate``, which reads radians, so its rotations span +-15 rad; and its
augmentation never runs because the validation transforms overwrite the
training ones, see DigITs-AIML/MMNN_STS ``main.py`` and
``data/ImageDatasets.py``.)
"""

from __future__ import annotations

import functools
import itertools
import operator

import jax
import jax.numpy as jnp


def _rotation(angles: jax.Array) -> jax.Array:
  """``[3, 3]`` rotation from three angles (radians) about the three axes."""
  ca, cb, cc = jnp.cos(angles)
  sa, sb, sc = jnp.sin(angles)
  one, zero = jnp.ones(()), jnp.zeros(())
  rx = jnp.array([[one, zero, zero], [zero, ca, -sa], [zero, sa, ca]])
  ry = jnp.array([[cb, zero, sb], [zero, one, zero], [-sb, zero, cb]])
  rz = jnp.array([[cc, -sc, zero], [sc, cc, zero], [zero, zero, one]])
  return rx @ ry @ rz


def random_affine(rng: jax.Array, *, flip_prob: float = 0.5, max_rotation_deg: float = 15.0,
                  zoom_range: tuple[float, float] = (0.9, 1.1)) -> jax.Array:
  """Draws one ``[3, 3]`` matrix: per-axis flips, rotation and isotropic zoom.

  The matrix maps output voxel offsets from the volume centre to input
  offsets. Zoom z > 1 magnifies (samples a smaller region).
  """
  k_flip, k_rot, k_zoom = jax.random.split(rng, 3)
  flips = jnp.where(jax.random.uniform(k_flip, (3,)) < flip_prob, -1.0, 1.0)
  angles = jnp.deg2rad(max_rotation_deg) * jax.random.uniform(k_rot, (3,), minval=-1.0,
                                                               maxval=1.0)
  zoom = jax.random.uniform(k_zoom, (), minval=zoom_range[0], maxval=zoom_range[1])
  return _rotation(angles) @ jnp.diag(flips) / zoom


def _trilinear_nearest(volume: jax.Array, coords: jax.Array) -> jax.Array:
  """Trilinear interpolation of every channel at ``coords``, edge values outside.

  Args:
    volume: ``[depth, height, width, channels]``.
    coords: ``[3, n]`` voxel coordinates (float32).

  Returns:
    ``[n, channels]``: per channel exactly what
    ``jax.scipy.ndimage.map_coordinates(v, coords, order=1, mode="nearest")``
    computes (the same corner weights, the same products and the same sum
    order), with the indices and weights computed once for all channels and
    each corner gathered as whole ``[channels]`` rows.
  """
  shape = volume.shape[:3]
  flat = volume.reshape(-1, volume.shape[-1])
  per_axis = []
  for c, size in zip(coords, shape):
    lower = jnp.floor(c)
    upper_weight = c - lower
    index = lower.astype(jnp.int32)
    per_axis.append([(jnp.clip(index, 0, size - 1), 1 - upper_weight),
                     (jnp.clip(index + 1, 0, size - 1), upper_weight)])
  outputs = []
  for (i, wi), (j, wj), (k, wk) in itertools.product(*per_axis):
    rows = (i * shape[1] + j) * shape[2] + k
    weight = functools.reduce(operator.mul, (wi, wj, wk))
    outputs.append(weight[:, None] * flat[rows])
  return functools.reduce(operator.add, outputs)


def apply_affine(volume: jax.Array, matrix: jax.Array) -> jax.Array:
  """Resamples ``volume`` ``[depth, height, width, channels]`` by ``matrix`` ``[3, 3]``.

  Trilinear interpolation about the volume centre; outside the field of view
  the nearest edge value is used (``map_coordinates(order=1,
  mode="nearest")`` per channel, computed for all channels at once).
  """
  shape = volume.shape[:3]
  centre = (jnp.asarray(shape, jnp.float32) - 1.0) / 2.0
  grid = jnp.stack(jnp.meshgrid(*[jnp.arange(s, dtype=jnp.float32) for s in shape],
                                indexing="ij"), axis=0).reshape(3, -1)
  coords = matrix @ (grid - centre[:, None]) + centre[:, None]
  return _trilinear_nearest(volume, coords).reshape(volume.shape)


def augment_batch(rng: jax.Array, images: jax.Array, *, flip_prob: float = 0.5,
                  max_rotation_deg: float = 15.0,
                  zoom_range: tuple[float, float] = (0.9, 1.1)) -> jax.Array:
  """Augments ``images`` ``[batch, depth, height, width, channels]``, one map per patient.

  Returns an array of the same shape and dtype.
  """
  keys = jax.random.split(rng, images.shape[0])
  mats = jax.vmap(lambda k: random_affine(k, flip_prob=flip_prob,
                                          max_rotation_deg=max_rotation_deg,
                                          zoom_range=zoom_range))(keys)
  out = jax.vmap(apply_affine)(images.astype(jnp.float32), mats)
  return out.astype(images.dtype)
