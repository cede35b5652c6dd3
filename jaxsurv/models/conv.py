"""3D convolution with a backend-chosen implementation, Flax Linen.

``Conv3D`` computes exactly what ``flax.linen.Conv`` computes for a 3D
kernel (same ``kernel`` ``[kd, kh, kw, in, out]`` and ``bias`` parameters,
so checkpoints are interchangeable), in one of four ways:

* ``"native"``: one ``lax.conv_general_dilated`` over ``[batch, depth,
  height, width, channels]`` (cuDNN on GPU);
* ``"slices"``: the depth axis is unrolled. For a kernel of depth ``kd``,
  depth stride ``s`` and depth padding ``(p0, p1)``::

    y[:, z] = sum_k conv2d(x_pad[:, s z + k], W[k])      k = 0 .. kd - 1

  computed as ONE 2D convolution over the ``batch * depth_out`` slices whose
  channels are the ``kd`` depth-shifted copies of the input stacked
  (``[kd * in]`` channels against the kernel reshaped to ``[kh, kw, kd * in,
  out]``). XLA's CPU backend runs 2D convolutions several times faster than
  3D ones (see ``benchmarks/RESULTS.md``), at the cost of ``kd`` copies of
  the input in memory.
* ``"dot"``: an unpadded 1^3 kernel with stride 1 as a matrix product over the
  channels (``einsum``), which XLA's CPU backend runs about twice as fast as
  the equivalent 3D convolution;
* ``"cols"``: im2col over the kernel taps that reach at least one input
  voxel (a tap that only ever meets zero padding adds exactly zero and is
  left out), then one matrix product ``[batch * out_voxels, taps * in] x
  [taps * in, out]``. For the tiny grids at the end of a DenseNet (2^3 and
  1^3 voxels: at 1^3 with "SAME" padding only the centre tap remains) it
  is 2-3x faster on XLA's CPU backend than the other two;
* ``"auto"`` (default): on the CPU backend ``"dot"`` for unpadded 1^3
  kernels with stride 1, ``"cols"`` when the output has at most
  ``COLS_MAX_VOXELS`` voxels per sample or the kernel is 3^3 with stride 2
  (a 3^3 stem, as in the ``local`` MMNN config), ``"slices"`` for the
  others; elsewhere ``"native"``. For a 3^3 kernel at stride 2, "cols" took
  0.60-0.92x the time of "slices" (forward + kernel gradient, 2 cores, at 8
  shapes from 1 to 8 input channels and 8 to 32 output channels); at
  stride 1 it took 1.0-2.1x, and for a 5^3 kernel 2.8x.

All give the same outputs and gradients up to float32 summation order
(``tests/test_conv.py``).

Which library runs a 2D convolution is XLA's choice, made per compiled
program: jaxlib 0.10's CPU compiler hands dots, reductions and 2D
convolutions in ``NHWC``/``HWIO`` layout with more than 16 channels to
YNNPACK ("library fusions"), the other convolutions to Eigen.
``cpu_compiler_options("eigen")`` keeps every convolution on Eigen (dots and
reductions stay on YNNPACK); the trainer passes it to ``jax.jit`` when the
config says ``xla_cpu_convolutions="eigen"``. On 2 cores, for DenseNet-121
at a 32^3 input and batch 2, Eigen ran the block-1 convolution (forward +
gradients) 1.5x and the stem 1.2x faster than YNNPACK, which used one thread
for them, and the whole step 0-7% faster (three runs). At the ``local``
config's shapes YNNPACK was 0-5% faster (``benchmarks/RESULTS.md``).
"""

from __future__ import annotations

from typing import Any, Sequence

import functools
import itertools
import math
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

IMPLS = ("auto", "native", "slices", "dot", "cols")

# "auto" on CPU uses "cols" up to this many output voxels per sample (2^3):
# measured on a 2-core CPU, forward + gradients of the DenseNet-121 3^3
# convolution (128 -> 32 channels, batch 2): at 2^3 0.5 ms as "cols" against
# 1.1 ms as "slices", at 1^3 0.16 against 0.50 ms, at 4^3 level (1.3 ms).
COLS_MAX_VOXELS = 8


# ``xla_cpu_convolutions`` values (module docstring).
CPU_CONV_LIBRARIES = ("xla", "eigen")

# The XLA option listing the operation kinds the CPU compiler gives YNNPACK,
# and that list without convolutions: jaxlib 0.10.2's default is individual
# dots, reductions and individual convolutions.
_LIBRARY_FUSION_OPTION = "xla_cpu_experimental_ynn_fusion_type"
_WITHOUT_CONVOLUTIONS = "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"


@functools.lru_cache(maxsize=None)
def _xla_accepts(option: str, value: str) -> bool:
  """Whether this jaxlib's compiler takes ``option=value`` (one tiny compile)."""
  try:
    jax.jit(lambda x: x + 1, compiler_options={option: value}).lower(
        jnp.zeros((), jnp.float32)).compile()
  except jax.errors.JaxRuntimeError:
    return False
  return True


def cpu_compiler_options(library: str = "xla", backend: str | None = None) -> dict:
  """``compiler_options`` for ``jax.jit`` that choose the CPU convolution library.

  Args:
    library: ``"xla"`` (XLA's own choice: YNNPACK for 2D convolutions with
      more than 16 channels) or ``"eigen"`` (every convolution on Eigen; dots
      and reductions stay on YNNPACK). See the module docstring.
    backend: the backend the program is compiled for (default: JAX's default
      backend). Only ``"cpu"`` gets options.

  Returns:
    ``{}`` for ``"xla"``, for another backend, or when this jaxlib does not
    know the option (with a warning); else the one XLA option.

  Raises:
    ValueError: ``library`` is not one of ``CPU_CONV_LIBRARIES``.
  """
  if library not in CPU_CONV_LIBRARIES:
    raise ValueError(f"xla_cpu_convolutions must be one of {CPU_CONV_LIBRARIES}, "
                     f"got {library!r}")
  if library == "xla" or (backend or jax.default_backend()) != "cpu":
    return {}
  if not _xla_accepts(_LIBRARY_FUSION_OPTION, _WITHOUT_CONVOLUTIONS):
    warnings.warn(f"this jaxlib ({jax.__version__}) has no XLA option "
                  f"{_LIBRARY_FUSION_OPTION}={_WITHOUT_CONVOLUTIONS}; "
                  "xla_cpu_convolutions='eigen' is ignored (XLA's own choice is used)")
    return {}
  return {_LIBRARY_FUSION_OPTION: _WITHOUT_CONVOLUTIONS}


def _pairs(padding, kernel_size) -> tuple:
  if isinstance(padding, str):
    if padding.upper() != "SAME":
      raise ValueError(f"Conv3D padding must be 'SAME' or ((lo, hi),) * 3, got {padding!r}")
    return tuple(((k - 1) // 2, k // 2) for k in kernel_size)
  pads = tuple(tuple(int(v) for v in p) for p in padding)
  if len(pads) != 3 or any(len(p) != 2 for p in pads):
    raise ValueError(f"Conv3D padding must be three (lo, hi) pairs, got {padding!r}")
  return pads


def _out_size(n: int, k: int, s: int, p0: int, p1: int) -> int:
  return (n + p0 + p1 - k) // s + 1


def choose_impl(impl: str, kernel_size: Sequence[int], strides: Sequence[int],
                backend: str | None = None,
                padding: Sequence[Sequence[int]] = ((0, 0),) * 3,
                spatial: Sequence[int] | None = None) -> str:
  """``"native"``, ``"slices"``, ``"dot"`` or ``"cols"`` for a setting
  (``impl="auto"``: by backend and, given the input's ``spatial`` size
  ``(depth, height, width)`` in voxels, by the output's size; ``"dot"`` only
  for an unpadded 1^3 kernel with stride 1).

  Raises:
    ValueError: unknown ``impl``, or ``"dot"`` for another kernel, stride or
      padding.
  """
  if impl not in IMPLS:
    raise ValueError(f"Conv3D impl must be one of {IMPLS}, got {impl!r}")
  pointwise = (tuple(kernel_size) == (1, 1, 1) and tuple(strides) == (1, 1, 1)
               and all(tuple(p) == (0, 0) for p in padding))
  if impl == "dot" and not pointwise:
    raise ValueError(f"Conv3D impl='dot' needs an unpadded 1^3 kernel with stride 1, got "
                     f"kernel {tuple(kernel_size)}, strides {tuple(strides)}, padding "
                     f"{tuple(map(tuple, padding))}")
  if impl != "auto":
    return impl
  if (backend or jax.default_backend()) != "cpu":
    return "native"
  if pointwise:
    return "dot"
  if spatial is not None:
    out = math.prod(_out_size(n, k, s, *p)
                    for n, k, s, p in zip(spatial, kernel_size, strides, padding))
    if out <= COLS_MAX_VOXELS:
      return "cols"
  if tuple(kernel_size) == (3, 3, 3) and tuple(strides) == (2, 2, 2):
    return "cols"
  return "slices"


def tap(x: jax.Array, axis: int, start: int, stride: int, n_out: int) -> jax.Array:
  """The ``n_out`` elements of ``x`` along ``axis`` that kernel tap ``start``
  meets at stride ``stride`` (``x[..., start : start + stride * (n_out - 1) + 1
  : stride, ...]``)."""
  return jax.lax.slice_in_dim(x, start, start + stride * (n_out - 1) + 1, stride, axis=axis)


def _live_taps(n: int, k: int, s: int, p0: int, p1: int) -> list[int]:
  """Kernel taps along one axis that meet at least one real (unpadded) input."""
  m = _out_size(n, k, s, p0, p1)
  return [t for t in range(k) if any(0 <= q * s + t - p0 < n for q in range(m))]


def conv3d_cols(x: jax.Array, kernel: jax.Array, strides: Sequence[int],
                padding: Sequence[Sequence[int]]) -> jax.Array:
  """3D convolution as im2col over the live taps and one matrix product.

  Args:
    x: ``[batch, depth, height, width, in]``.
    kernel: ``[kd, kh, kw, in, out]``.
    strides: ``(sd, sh, sw)``.
    padding: ``((d0, d1), (h0, h1), (w0, w1))``.

  Returns:
    ``[batch, depth_out, height_out, width_out, out]``, as
    ``lax.conv_general_dilated`` with the same arguments. Taps that meet only
    padding are left out of the sum (they add exactly zero; their kernel
    gradient is exactly zero either way).
  """
  b, *spatial, c = x.shape
  o = kernel.shape[-1]
  axes = list(zip(spatial, kernel.shape[:3], strides, padding))  # (n, k, s, (p0, p1)) per axis
  outs = [_out_size(n, k, s, *p) for n, k, s, p in axes]
  live = [_live_taps(n, k, s, *p) for n, k, s, p in axes]
  xp = jnp.pad(x, ((0, 0), *[tuple(p) for p in padding], (0, 0)))
  cols = []
  for taps in itertools.product(*live):
    window = xp
    for axis, (t, s, m) in enumerate(zip(taps, strides, outs), start=1):
      window = tap(window, axis, t, s, m)
    cols.append(window)
  cols = cols[0] if len(cols) == 1 else jnp.concatenate(cols, axis=-1)
  k = kernel[np.ix_(live[0], live[1], live[2])] if any(
      len(t) < n for t, n in zip(live, kernel.shape[:3])) else kernel
  y = cols.reshape(-1, cols.shape[-1]) @ k.reshape(-1, o)
  return y.reshape(b, *outs, o)


def conv3d_slices(x: jax.Array, kernel: jax.Array, strides: Sequence[int],
                  padding: Sequence[Sequence[int]]) -> jax.Array:
  """3D convolution as one 2D convolution over depth slices (module docstring).

  Args:
    x: ``[batch, depth, height, width, in]``.
    kernel: ``[kd, kh, kw, in, out]``.
    strides: ``(sd, sh, sw)``.
    padding: ``((d0, d1), (h0, h1), (w0, w1))``.

  Returns:
    ``[batch, depth_out, height_out, width_out, out]``, as
    ``lax.conv_general_dilated`` with the same arguments.
  """
  b, d, h, w, c = x.shape
  kd, kh, kw, _, o = kernel.shape
  (d0, d1), hp, wp = padding
  sd = strides[0]
  xp = jnp.pad(x, ((0, 0), (d0, d1), (0, 0), (0, 0), (0, 0)))
  d_out = (d + d0 + d1 - kd) // sd + 1
  stacked = jnp.concatenate([tap(xp, 1, k, sd, d_out) for k in range(kd)], axis=-1)
  stacked = stacked.reshape(b * d_out, h, w, kd * c)
  k2 = jnp.transpose(kernel, (1, 2, 0, 3, 4)).reshape(kh, kw, kd * c, o)
  y = jax.lax.conv_general_dilated(stacked, k2, tuple(strides[1:]), (tuple(hp), tuple(wp)),
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return y.reshape(b, d_out, *y.shape[1:])


class Conv3D(nn.Module):
  """``nn.Conv`` for 3D kernels with a choice of implementation.

  Attributes:
    features: output channels.
    kernel_size: ``(kd, kh, kw)`` in voxels.
    strides: ``(sd, sh, sw)``.
    padding: ``"SAME"`` or ``((lo, hi),) * 3`` in voxels.
    use_bias: add a bias.
    kernel_init, bias_init: initialisers (as ``nn.Conv``).
    dtype: computation dtype (None: that of the input and kernel, promoted).
    impl: ``"auto"``, ``"native"``, ``"slices"``, ``"dot"`` or ``"cols"``
      (module docstring).

  ``__call__(x)``: ``x`` ``[batch, depth, height, width, in]`` ->
  ``[batch, depth', height', width', features]``.
  """
  features: int
  kernel_size: Sequence[int] = (3, 3, 3)
  strides: Sequence[int] = (1, 1, 1)
  padding: Any = "SAME"
  use_bias: bool = True
  kernel_init: Any = nn.initializers.lecun_normal()
  bias_init: Any = nn.initializers.zeros
  dtype: Any = None
  impl: str = "auto"

  @nn.compact
  def __call__(self, x):
    ks, st = tuple(self.kernel_size), tuple(self.strides)
    if x.ndim != 5 or len(ks) != 3 or len(st) != 3:
      raise ValueError(f"Conv3D expects [batch, depth, height, width, channels] and 3D kernel "
                       f"and strides, got input {tuple(x.shape)}, kernel {ks}, strides {st}")
    kernel = self.param("kernel", self.kernel_init, (*ks, x.shape[-1], self.features),
                        jnp.float32)
    bias = (self.param("bias", self.bias_init, (self.features,), jnp.float32)
            if self.use_bias else None)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    pads = _pairs(self.padding, ks)
    impl = choose_impl(self.impl, ks, st, padding=pads, spatial=x.shape[1:4])
    if impl == "slices":
      y = conv3d_slices(x, kernel, st, pads)
    elif impl == "cols":
      y = conv3d_cols(x, kernel, st, pads)
    elif impl == "dot":
      y = jnp.einsum("bdhwc,co->bdhwo", x, kernel[0, 0, 0])
    else:
      y = jax.lax.conv_general_dilated(x, kernel, st, pads,
                                       dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
    if bias is not None:
      y = y + bias
    return y
