"""Conv3D's depth-slice and im2col implementations against the plain 3D convolution.

Forward values and gradients (input and kernel) of ``conv3d_slices`` and
``conv3d_cols`` must match ``lax.conv_general_dilated``; ``Conv3D`` must have ``nn.Conv``'s
parameters; DenseNet3D and the whole MMNN train step must give the same
outputs, gradients and updated parameters with either implementation, and
the trainer's step the same on either CPU convolution library
(``cpu_compiler_options``).
"""

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxsurv import tasks
from jaxsurv.models import MMNN, registry
from jaxsurv.models.conv import (Conv3D, choose_impl, conv3d_cols, conv3d_slices,
                                 cpu_compiler_options)
from jaxsurv.models.densenet3d import DenseNet3D
from jaxsurv.trainer import step as step_lib

DN = ("NDHWC", "DHWIO", "NDHWC")


@pytest.mark.parametrize("kernel,strides,padding", [
    ((3, 3, 3), (1, 1, 1), ((1, 1), (1, 1), (1, 1))),
    ((3, 1, 3), (1, 2, 1), ((2, 0), (0, 0), (1, 1))),  # asymmetric padding, in-plane stride
    ((2, 3, 3), (1, 1, 2), ((0, 1), (1, 1), (0, 0))),
    ((3, 3, 3), (2, 2, 2), ((1, 1), (1, 1), (1, 1))),  # the DenseNet stem: stride 2
    ((7, 7, 7), (2, 2, 2), ((3, 3), (3, 3), (3, 3))),
])
def test_slices_equal_the_plain_convolution_and_its_gradients(kernel, strides, padding):
  x = jax.random.normal(jax.random.key(0), (2, 9, 6, 7, 3))
  w = jax.random.normal(jax.random.key(1), (*kernel, 3, 4))
  native = lambda x, w: jax.lax.conv_general_dilated(x, w, strides, padding,
                                                     dimension_numbers=DN)
  sliced = lambda x, w: conv3d_slices(x, w, strides, padding)
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                  atol=2e-6 * float(np.abs(b).max()))
  close(sliced(x, w), native(x, w))
  r = jax.random.normal(jax.random.key(2), native(x, w).shape)  # a fixed output cotangent
  loss = lambda f: lambda x, w: jnp.sum(r * f(x, w))
  g_native = jax.grad(loss(native), argnums=(0, 1))(x, w)
  g_sliced = jax.grad(loss(sliced), argnums=(0, 1))(x, w)
  for a, b in zip(g_sliced, g_native):
    close(a, b)


@pytest.mark.parametrize("shape,kernel,strides,padding", [
    ((2, 1, 1, 1, 3), (3, 3, 3), (1, 1, 1), ((1, 1),) * 3),  # only the centre tap is live
    ((2, 2, 2, 2, 3), (3, 3, 3), (1, 1, 1), ((1, 1),) * 3),
    ((2, 2, 1, 3, 3), (3, 2, 3), (1, 1, 2), ((1, 1), (0, 1), (2, 0))),
    ((1, 3, 3, 3, 2), (3, 3, 3), (2, 2, 2), ((1, 1),) * 3),  # a strided stem on a tiny grid
])
def test_cols_equal_the_plain_convolution_and_its_gradients(shape, kernel, strides, padding):
  x = jax.random.normal(jax.random.key(0), shape)
  w = jax.random.normal(jax.random.key(1), (*kernel, shape[-1], 4))
  native = lambda x, w: jax.lax.conv_general_dilated(x, w, strides, padding,
                                                     dimension_numbers=DN)
  cols = lambda x, w: conv3d_cols(x, w, strides, padding)
  ref = native(x, w)
  assert cols(x, w).shape == ref.shape
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                  atol=2e-6 * float(np.abs(b).max()))
  close(cols(x, w), ref)
  r = jax.random.normal(jax.random.key(2), ref.shape)
  grads = lambda f: jax.jit(jax.grad(lambda x, w: jnp.sum(r * f(x, w)), argnums=(0, 1)))(x, w)
  for a, b in zip(grads(cols), grads(native)):
    close(a, b)
  if shape[1:4] == (1, 1, 1):  # taps that meet only padding get an exactly zero gradient
    g = np.asarray(grads(cols)[1])
    assert np.all(np.delete(g.reshape(27, -1), 13, axis=0) == 0)


def test_conv3d_module_has_nn_conv_parameters_and_values():
  x = jax.random.normal(jax.random.key(2), (2, 4, 5, 6, 3))
  ref = nn.Conv(4, (3, 3, 3), padding=((1, 1),) * 3, use_bias=True)
  v = ref.init(jax.random.key(3), x)
  pointwise = nn.Conv(4, (1, 1, 1), use_bias=False)
  vp = pointwise.init(jax.random.key(3), x)
  for impl in ("native", "dot", "auto"):
    mine = Conv3D(4, (1, 1, 1), padding="SAME", use_bias=False, impl=impl)
    np.testing.assert_allclose(mine.apply(vp, x), pointwise.apply(vp, x), atol=2e-5, rtol=1e-5)
  padded = nn.Conv(4, (1, 1, 1), padding=((1, 1), (0, 0), (2, 0)), use_bias=False)
  mine = Conv3D(4, (1, 1, 1), padding=((1, 1), (0, 0), (2, 0)), use_bias=False, impl="auto")
  np.testing.assert_allclose(mine.apply(vp, x), padded.apply(vp, x), atol=2e-5, rtol=1e-5)
  for impl in ("native", "slices", "auto"):
    mine = Conv3D(4, (3, 3, 3), padding=((1, 1),) * 3, use_bias=True, impl=impl)
    assert jax.tree.map(jnp.shape, mine.init(jax.random.key(3), x)) == jax.tree.map(jnp.shape, v)
    np.testing.assert_allclose(mine.apply(v, x), ref.apply(v, x), atol=2e-5, rtol=1e-5)
  with pytest.raises(ValueError, match="impl must be one of"):
    Conv3D(4, impl="fast").init(jax.random.key(0), x)


def test_auto_picks_slices_on_cpu_only():
  assert choose_impl("auto", (3, 3, 3), (1, 1, 1), backend="cpu") == "slices"
  assert choose_impl("auto", (3, 3, 3), (1, 1, 1), backend="gpu") == "native"
  assert choose_impl("auto", (1, 1, 1), (1, 1, 1), backend="cpu") == "dot"
  assert choose_impl("auto", (1, 1, 1), (1, 1, 1), backend="gpu") == "native"
  with pytest.raises(ValueError, match="1\\^3 kernel"):
    choose_impl("dot", (3, 3, 3), (1, 1, 1), backend="cpu")
  # A padded 1^3 convolution is not a plain product.
  padded = ((1, 1), (0, 0), (0, 0))
  assert choose_impl("auto", (1, 1, 1), (1, 1, 1), backend="cpu", padding=padded) == "slices"
  with pytest.raises(ValueError, match="unpadded"):
    choose_impl("dot", (1, 1, 1), (1, 1, 1), backend="cpu", padding=padded)
  assert choose_impl("auto", (7, 7, 7), (2, 2, 2), backend="cpu") == "slices"
  assert choose_impl("auto", (3, 3, 3), (2, 2, 2), backend="cpu") == "cols"
  assert choose_impl("auto", (3, 3, 3), (2, 2, 2), backend="gpu") == "native"
  assert choose_impl("native", (3, 3, 3), (1, 1, 1), backend="cpu") == "native"
  # Given the input size: "cols" up to 2^3 output voxels on CPU, never on GPU.
  same = ((1, 1),) * 3
  for n, want in ((1, "cols"), (2, "cols"), (3, "slices"), (8, "slices")):
    assert choose_impl("auto", (3, 3, 3), (1, 1, 1), backend="cpu", padding=same,
                       spatial=(n, n, n)) == want
  assert choose_impl("auto", (3, 3, 3), (1, 1, 1), backend="gpu", padding=same,
                     spatial=(1, 1, 1)) == "native"
  assert choose_impl("auto", (1, 1, 1), (1, 1, 1), backend="cpu", spatial=(1, 1, 1)) == "dot"


def _densenet(impl):  # "slices": 1^3 convolutions stay native
  return DenseNet3D(init_features=4, growth_rate=3, block_config=(2, 1), bn_size=2,
                    dropout_rate=0.0, head_dropout_rate=0.0, stem_kernel=3, conv_impl=impl)


def test_densenet_outputs_and_gradients_do_not_depend_on_the_implementation():
  x = jax.random.normal(jax.random.key(4), (2, 12, 12, 12, 2))
  init = lambda impl: functools.partial(_densenet(impl).init, train=False)
  v = jax.jit(init("native"))(jax.random.key(5), x)
  outs, grads = {}, {}
  for impl in ("native", "slices", "auto"):
    model = _densenet(impl)
    assert jax.tree.map(jnp.shape, jax.eval_shape(init(impl), jax.random.key(5), x)) == \
        jax.tree.map(jnp.shape, v)

    def loss(params, model=model):
      (emb, _), _ = model.apply({**v, "params": params}, x, train=True,
                                mutable=["batch_stats"])
      return jnp.sum(emb ** 2), emb
    (_, outs[impl]), grads[impl] = jax.jit(jax.value_and_grad(loss, has_aux=True))(v["params"])
  for impl in ("slices", "auto"):
    np.testing.assert_allclose(outs[impl], outs["native"], atol=1e-4, rtol=1e-4)
    for a, b in zip(jax.tree.leaves(grads[impl]), jax.tree.leaves(grads["native"])):
      np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-3)


def test_mmnn_train_step_is_the_same_with_either_implementation():
  rng = np.random.default_rng(0)
  b = 4
  batch = {"inputs": {"image": rng.normal(size=(b, 16, 16, 16, 2)).astype(np.float32),
                      "clinical": rng.normal(size=(b, 3)).astype(np.float32)},
           "presence": {}, "duration": rng.integers(1, 6, size=(b, 2)).astype(np.float32),
           "event": np.array([[1, 0], [1, 1], [0, 1], [1, 1]], np.int32),
           "outcome_mask": np.ones((b, 2), bool), "mask": np.ones(b, bool)}
  tx = optax.identity()
  results = {}
  for impl in ("native", "auto"):
    model = MMNN(n_outcomes=2, image_kwargs=dict(init_features=4, growth_rate=3,
                                                 block_config=(1, 1), bn_size=2,
                                                 dropout_rate=0.0, head_dropout_rate=0.0,
                                                 stem_kernel=3, conv_impl=impl),
                 clinical_kwargs=dict(hidden_sizes=(8,), dropout_rate=0.0))
    v = jax.jit(functools.partial(model.init, train=False))(
        jax.random.key(0), batch["inputs"]["image"][:1], batch["inputs"]["clinical"][:1])
    state = step_lib.TrainState(step=jnp.zeros((), jnp.int32), params=v["params"],
                                batch_stats=v["batch_stats"], opt_state=tx.init(v["params"]))
    step = jax.jit(functools.partial(
        step_lib.train_step, model=model, call=registry.get("mmnn").adapter, tx=tx,
        task=tasks.CoxHeads(heads=("mm", "image", "clinical"), outcomes=("os", "dm")),
        augment=None, l1=0.0, l1_include="all"))
    results[impl] = step(state, batch, jax.random.key(1), jnp.float32(0.5),
                         jnp.array([0.5, 0.3, 0.2]))
  (s_n, m_n), (s_s, m_s) = results["native"], results["auto"]
  np.testing.assert_allclose(m_s["loss"], m_n["loss"], rtol=1e-5)
  moved = max(float(np.max(np.abs(np.asarray(a) - np.asarray(c))))
              for a, c in zip(jax.tree.leaves(s_n.params), jax.tree.leaves(v["params"])))
  assert moved > 1e-3  # the step changed the parameters
  for a, c in zip(jax.tree.leaves(s_s.params), jax.tree.leaves(s_n.params)):
    np.testing.assert_allclose(a, c, atol=1e-5, rtol=1e-4)


def _ynn_convolutions(hlo: str) -> int:
  """Convolutions inside YNNPACK fusions of a compiled program's HLO text."""
  bodies = dict(re.findall(r"^(%\S+) [^\n]*\{\n(.*?)\n\}", hlo, re.M | re.S))
  called = re.findall(r"calls=(%[\w.\-]+)[^\n]*__ynn_fusion", hlo)
  return sum(bodies.get(name, "").count(" convolution(") for name in called)


def test_cpu_compiler_options_move_convolutions_from_ynnpack_to_eigen():
  x = jax.random.normal(jax.random.key(0), (2, 6, 6, 24))
  k = jax.random.normal(jax.random.key(1), (3, 3, 24, 20))
  f = lambda x, k: jax.lax.conv_general_dilated(x, k, (1, 1), "SAME",
                                                dimension_numbers=("NHWC", "HWIO", "NHWC"))
  opts = cpu_compiler_options("eigen", backend="cpu")
  assert opts and cpu_compiler_options("xla", backend="cpu") == {}
  assert cpu_compiler_options("eigen", backend="gpu") == {}
  with pytest.raises(ValueError, match="xla_cpu_convolutions must be one of"):
    cpu_compiler_options("mkl")
  xla = jax.jit(f).lower(x, k).compile()
  eigen = jax.jit(f, compiler_options=opts).lower(x, k).compile()
  # XLA's own choice gives this 24 -> 20 channel convolution to YNNPACK, the option does not.
  assert _ynn_convolutions(xla.as_text()) == 1
  assert _ynn_convolutions(eigen.as_text()) == 0 and " convolution(" in eigen.as_text()
  np.testing.assert_allclose(eigen(x, k), xla(x, k), rtol=1e-5, atol=1e-5)


# 16^3: the dense layer's 3^3 convolution then runs at 4^3 as "slices" (the
# stem, 3^3 at stride 2, runs as "cols").
_TINY_GRID = (16, 16, 16)


def _tiny_mmnn_config(library):
  from configs import mmnn  # pylint: disable=import-outside-toplevel
  c = mmnn.get_config("local")
  # More than 16 channels, so that XLA gives the dense layer's convolution to
  # YNNPACK by default.
  c.data.preprocess.grid = _TINY_GRID
  c.model.image.update(dict(init_features=20, growth_rate=5, block_config=(1,), bn_size=4,
                            dropout_rate=0.0, head_dropout_rate=0.0))
  c.model.clinical.dropout_rate = 0.0
  c.batch_size = 4
  # Plain SGD: Adam's first step is about lr * sign(gradient), which turns
  # float32 rounding of near-zero gradients into whole-step differences.
  c.optimizer.update(dict(name="sgd", momentum=0.0, nesterov=False, weight_decay=0.0))
  c.xla_cpu_convolutions = library
  return c


def test_trainer_step_is_the_same_on_either_cpu_convolution_library():
  from jaxsurv import train  # pylint: disable=import-outside-toplevel
  from jaxsurv.trainer import loop  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  b = 4
  part = loop.Part({"inputs": {"image": rng.normal(size=(b, *_TINY_GRID, 2)).astype(np.float32),
                               "clinical": rng.normal(size=(b, 11)).astype(np.float32)},
                    "presence": {}, "duration": rng.integers(1, 6, size=(b, 2)).astype(np.float32),
                    "event": np.array([[1, 0], [1, 1], [0, 1], [1, 1]], np.int32),
                    "outcome_mask": np.ones((b, 2), bool)})
  out, hlo = {}, {}
  for library in ("xla", "eigen"):
    trainer = train.make_trainer(_tiny_mmnn_config(library))
    state = trainer.init_state(jax.random.key(0), part)
    params0 = jax.device_get(state.params)
    batch = trainer.batch(part, np.arange(b), b)
    args = (batch, jax.random.key(1), jnp.float32(1e-2), jnp.array([0.5, 0.3, 0.2]))
    step = trainer.train_step.lower(state, *args).compile()
    hlo[library] = step.as_text()
    out[library] = jax.device_get(step(state, *args))
  assert _ynn_convolutions(hlo["xla"]) > 0 and _ynn_convolutions(hlo["eigen"]) == 0
  (s_x, m_x), (s_e, m_e) = out["xla"], out["eigen"]
  np.testing.assert_allclose(m_e["loss"], m_x["loss"], rtol=1e-5)
  moved = max(float(np.max(np.abs(a - c)))
              for a, c in zip(jax.tree.leaves(s_x.params), jax.tree.leaves(params0)))
  assert moved > 1e-4  # the step changed the parameters
  for a, c in zip(jax.tree.leaves(s_e.params), jax.tree.leaves(s_x.params)):
    np.testing.assert_allclose(a, c, atol=1e-5, rtol=1e-4)


def test_an_unknown_cpu_convolution_library_is_a_user_error():
  from jaxsurv.errors import UserError  # pylint: disable=import-outside-toplevel
  from jaxsurv.trainer import loop  # pylint: disable=import-outside-toplevel
  with pytest.raises(UserError, match="config.xla_cpu_convolutions must be one of"):
    loop.compiler_options(_tiny_mmnn_config("mkl"))
