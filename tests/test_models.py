"""Tests for jaxsurv.models: DenseNet3D, ClinicalMLP and MMNN.

Tiny configs (growth 4, blocks (1, 1), 8 initial features, 16^3 volumes) keep
compile times small; the full DenseNet-121 is only traced with
``jax.eval_shape`` (no compile) for its parameter count.
"""

import collections
import functools

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsurv.models import MMNN, ClinicalMLP, DenseLayer, DenseNet3D
from jaxsurv.models.densenet3d import _group_count

TINY = dict(init_features=8, growth_rate=4, block_config=(1, 1))
N_CLIN = 11

# Per-function XLA options (what jax_disable_most_optimizations sets, but
# without touching global config shared with other test files): compiles the
# tiny 3D conv nets several times faster on CPU; run time is irrelevant here.
_fast_jit = functools.partial(jax.jit, compiler_options={
    "xla_backend_optimization_level": 0,
    "xla_llvm_disable_expensive_passes": True})


def _n_params(tree) -> int:
  return int(sum(np.prod(a.shape) for a in jax.tree.leaves(tree)))


@functools.partial(_fast_jit, static_argnums=(0,))
def _init(model, *args):
  return model.init({"params": jax.random.key(0), "dropout": jax.random.key(1)},
                    *args, train=False)


@functools.partial(_fast_jit, static_argnums=(0, 4))
def _apply(model, variables, x, rng, train):
  """Applies a single-input model, returning (out, aux, new batch_stats)."""
  (out, aux), upd = model.apply(variables, x, train=train,
                                rngs={"dropout": rng}, mutable=["batch_stats"])
  return out, aux, upd.get("batch_stats")


@pytest.fixture(scope="module")
def volumes():
  return jax.random.normal(jax.random.key(42), (2, 16, 16, 16, 2), jnp.float32)


@pytest.fixture(scope="module")
def tiny_bn(volumes):
  model = DenseNet3D(**TINY)
  return model, _init(model, volumes)


# ---------------------------------------------------------------- DenseNet3D


def test_densenet121_parameter_count():
  # MONAI DenseNet121(spatial_dims=3, in_channels=2) features: 11,264,576
  # (counted on the MONAI module), plus the MMNN head Linear(1024 -> 12).
  model = DenseNet3D()
  x = jax.ShapeDtypeStruct((1, 32, 32, 32, 2), jnp.float32)
  shapes = jax.eval_shape(
      lambda x: model.init(jax.random.key(0), x, train=False), x)
  params = shapes["params"]
  assert _n_params(params) == 11_264_576 + 1024 * 12 + 12
  assert params["head"]["kernel"].shape == (1024, 12)
  assert params["conv0"]["kernel"].shape == (7, 7, 7, 2, 64)
  # 6 + 12 + 24 + 16 dense layers, three transitions.
  assert len([k for k in params if "_layer" in k]) == 58
  assert params["transition3_conv"]["kernel"].shape == (1, 1, 1, 1024, 512)
  assert params["norm5"]["bn"]["scale"].shape == (1024,)
  assert model.min_input_size() == 29


def test_densenet_shapes_intermediates_and_head(tiny_bn, volumes):
  model, variables = tiny_bn
  emb, aux, _ = _apply(model, variables, volumes, jax.random.key(0), False)
  assert emb.shape == (2, 12) and emb.dtype == jnp.float32
  assert np.all(np.isfinite(emb))
  # 16^3 -> stem conv 8^3 -> max-pool 4^3 -> transition 2^3.
  expected = {
      "stem": (2, 4, 4, 4, 8),
      "block_1": (2, 4, 4, 4, 12),  # 8 + 1 * 4 channels.
      "block_2": (2, 2, 2, 2, 10),  # 12 // 2 + 4.
      "last_dense_block": (2, 2, 2, 2, 10),
      "feature_map": (2, 2, 2, 2, 10),
      "pooled": (2, 10),
  }
  assert {k: tuple(v.shape) for k, v in aux.items()} == expected
  np.testing.assert_array_equal(aux["last_dense_block"], aux["block_2"])
  # Eval mode: embedding == Linear(global mean of the post-ReLU map), no
  # dropout, computed here by hand.
  fmap = np.asarray(aux["feature_map"], np.float64)
  assert fmap.min() >= 0
  pooled = fmap.mean(axis=(1, 2, 3))
  np.testing.assert_allclose(aux["pooled"], pooled, rtol=1e-5, atol=1e-6)
  head = variables["params"]["head"]
  np.testing.assert_allclose(
      emb, pooled @ np.asarray(head["kernel"]) + np.asarray(head["bias"]),
      rtol=1e-4, atol=1e-5)


def test_densenet_train_vs_eval_batchnorm(tiny_bn, volumes):
  model, variables = tiny_bn
  stats0 = variables["batch_stats"]
  e1, _, s_eval = _apply(model, variables, volumes, jax.random.key(1), False)
  e2, _, _ = _apply(model, variables, volumes, jax.random.key(2), False)
  # Eval: deterministic whatever the rng, running statistics untouched.
  np.testing.assert_array_equal(e1, e2)
  jax.tree.map(np.testing.assert_array_equal, s_eval, stats0)
  # Train: dropout depends on the rng; running statistics move.
  t1, _, s_train = _apply(model, variables, volumes, jax.random.key(1), True)
  t1b, _, _ = _apply(model, variables, volumes, jax.random.key(1), True)
  t2, _, _ = _apply(model, variables, volumes, jax.random.key(2), True)
  assert np.all(np.isfinite(t1))
  np.testing.assert_array_equal(t1, t1b)
  assert not np.allclose(t1, t2)
  assert not np.allclose(t1, e1)
  mean0 = np.asarray(stats0["norm0"]["bn"]["mean"])
  mean1 = np.asarray(s_train["norm0"]["bn"]["mean"])
  np.testing.assert_array_equal(mean0, 0.0)
  assert np.abs(mean1).max() > 0
  # Head dropout (rate 0.2) zeroes single embedding entries in train mode.
  assert np.any(t1 == 0)


def test_dense_layer_dropout_is_channelwise():
  # GroupNorm: the norm is the same in train and eval, so train output =
  # eval output * (channel mask / keep prob), constant over depth/height/width.
  layer = DenseLayer(growth_rate=8, dropout_rate=0.5, norm="group", num_groups=4)
  x = jax.random.normal(jax.random.key(0), (2, 3, 3, 3, 4))

  @_fast_jit  # Init and both applies in one program: a single compile.
  def both(x):
    v = layer.init(jax.random.key(1), x, False)
    return (layer.apply(v, x, False),
            layer.apply(v, x, True, rngs={"dropout": jax.random.key(5)}))

  ev, tr = both(x)
  np.testing.assert_array_equal(tr[..., :4], x)  # Input passes through.
  new_e, new_t = np.asarray(ev[..., 4:]), np.asarray(tr[..., 4:])
  ratio = new_t / new_e  # Conv outputs are non-zero almost surely.
  for b in range(2):
    for c in range(8):
      r = ratio[b, ..., c]
      assert np.allclose(r, 0.0) or np.allclose(r, 2.0), r
  kept = np.isclose(ratio[:, 0, 0, 0, :], 2.0)
  assert 0 < kept.sum() < kept.size  # Some channels kept, some dropped.


def test_densenet_groupnorm_batch1_train():
  model = DenseNet3D(**TINY, norm="group", num_groups=4)
  x = jax.random.normal(jax.random.key(3), (1, 16, 16, 16, 2))

  @_fast_jit  # Init + train-mode apply in one program: a single compile.
  def run(x):
    variables = model.init(jax.random.key(0), x, train=False)
    (emb, aux), upd = model.apply(variables, x, train=True,
                                  rngs={"dropout": jax.random.key(1)},
                                  mutable=["batch_stats"])
    return variables, emb, aux, upd

  variables, emb, aux, upd = run(x)
  assert "batch_stats" not in variables and not upd
  gn = variables["params"]["block1_layer1"]["norm1"]["gn"]
  assert gn["scale"].shape == (8,)
  assert emb.shape == (1, 12) and np.all(np.isfinite(emb))
  assert aux["last_dense_block"].shape == (1, 2, 2, 2, 10)
  assert [_group_count(c, 32) for c in (64, 96, 128, 1024)] == [32] * 4
  assert [_group_count(c, 4) for c in (8, 10, 12)] == [4, 2, 4]


def _primitive_counts(jaxpr) -> collections.Counter:
  """Primitive-name counts in a jaxpr, sub-jaxprs (jit, checkpoint) included."""
  counts = collections.Counter()
  for eqn in jaxpr.eqns:
    counts[eqn.primitive.name] += 1
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      counts += _primitive_counts(sub)
  return counts


def test_densenet_remat_wraps_dense_layers():
  # Traced only (no compile). With remat=True the forward holds checkpoint
  # regions and the gradient recomputes the dense layers' convolutions
  # (more conv ops than without remat); the parameter tree is identical, so
  # checkpoints are interchangeable.
  # Native convolutions: the counts below are of conv_general_dilated ops.
  cfg = dict(TINY, norm="group", num_groups=4, conv_impl="native")
  x = jnp.zeros((1, 16, 16, 16, 2))
  plain, remat = DenseNet3D(**cfg), DenseNet3D(**cfg, remat=True)
  init = lambda m: jax.eval_shape(
      lambda x: m.init(jax.random.key(0), x, train=False), x)
  p_shapes, r_shapes = init(plain), init(remat)
  assert jax.tree.structure(p_shapes) == jax.tree.structure(r_shapes)
  params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                        p_shapes["params"])

  def counts(model, grad):
    def loss(p, x):
      emb, _ = model.apply({"params": p}, x, train=True,
                           rngs={"dropout": jax.random.key(9)})
      return jnp.sum(emb ** 2)
    fn = jax.grad(loss) if grad else loss
    return _primitive_counts(jax.make_jaxpr(fn)(params, x).jaxpr)

  def n_remat(c):  # The primitive is "remat2" in jax 0.10, "checkpoint" before.
    return c["remat2"] + c["checkpoint"]

  assert n_remat(counts(plain, False)) == 0
  assert n_remat(counts(remat, False)) == 2  # One per dense layer.
  conv = "conv_general_dilated"
  # The backward pass recomputes the dense layers' convolutions.
  assert counts(remat, True)[conv] > counts(plain, True)[conv]


def test_densenet_gradcam_perturbation_hook():
  # Traced only: with perturb_last_block the gradient of a head output with
  # respect to the "perturbations" collection is d(out)/d(last dense block).
  model = DenseNet3D(**TINY, perturb_last_block=True)
  x = jax.ShapeDtypeStruct((2, 16, 16, 16, 2), jnp.float32)
  shapes = jax.eval_shape(
      lambda x: model.init(jax.random.key(0), x, train=False), x)
  assert shapes["perturbations"]["last_dense_block"].shape == (2, 2, 2, 2, 10)

  def first_feature(variables, x):
    emb, _ = model.apply(variables, x, train=False)
    return emb[:, 0].sum()

  grads = jax.eval_shape(jax.grad(first_feature), shapes, x)
  assert grads["perturbations"]["last_dense_block"].shape == (2, 2, 2, 2, 10)
  # Without the flag there is no extra collection.
  plain = jax.eval_shape(
      lambda x: DenseNet3D(**TINY).init(jax.random.key(0), x, train=False), x)
  assert "perturbations" not in plain


def test_densenet_bfloat16_compute_keeps_float32_params(tiny_bn, volumes):
  model, variables = tiny_bn
  bf = DenseNet3D(**TINY, dtype=jnp.bfloat16)
  bf_vars = jax.eval_shape(
      lambda x: bf.init(jax.random.key(0), x, train=False), volumes)
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(bf_vars["params"]))
  emb, aux, _ = _apply(bf, variables, volumes, jax.random.key(0), False)
  ref, _, _ = _apply(model, variables, volumes, jax.random.key(0), False)
  assert emb.dtype == jnp.float32
  assert aux["last_dense_block"].dtype == jnp.bfloat16
  np.testing.assert_allclose(emb, ref, rtol=0.1, atol=0.05)


def test_densenet_errors():
  model = DenseNet3D()
  with pytest.raises(ValueError, match="spatial size >= 29"):
    jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False),
                   jax.ShapeDtypeStruct((1, 16, 32, 32, 2), jnp.float32))
  with pytest.raises(ValueError, match=r"got shape \(2, 16, 16, 2\)"):
    jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False),
                   jax.ShapeDtypeStruct((2, 16, 16, 2), jnp.float32))
  with pytest.raises(ValueError, match="norm must be one of"):
    jax.eval_shape(
        lambda x: DenseNet3D(**TINY, norm="instance").init(
            jax.random.key(0), x, train=False),
        jax.ShapeDtypeStruct((1, 16, 16, 16, 2), jnp.float32))


# --------------------------------------------------------------- ClinicalMLP


def test_clinical_mlp_default_layer_sizes():
  x = jax.ShapeDtypeStruct((4, N_CLIN), jnp.float32)
  model = ClinicalMLP()
  shapes = jax.eval_shape(
      lambda x: model.init(jax.random.key(0), x, train=False), x)
  kernels = [shapes["params"][f"dense{i}"]["kernel"].shape for i in range(6)]
  # MMNN: 11 -> 32 -> 16 -> 8 -> 8 -> 8 -> 12 (DigITs-AIML/MMNN_STS
  # models/mlp.py).
  assert kernels == [(11, 32), (32, 16), (16, 8), (8, 8), (8, 8), (8, 12)]
  assert shapes["batch_stats"]["norm5"]["mean"].shape == (12,)
  for norm, has_stats in (("layer", False), ("none", False)):
    s = jax.eval_shape(
        lambda x: ClinicalMLP(norm=norm).init(jax.random.key(0), x,
                                              train=False), x)
    assert ("batch_stats" in s) == has_stats
    assert ("norm0" in s["params"]) == (norm == "layer")


def test_clinical_mlp_dropout_is_elementwise_not_rowwise():
  model = ClinicalMLP(norm="none", dropout_rate=0.5, final_activation=False)
  x = jax.random.normal(jax.random.key(0), (16, N_CLIN))

  @_fast_jit
  def run(x):
    v = model.init(jax.random.key(1), x, train=False)
    return (model.apply(v, x, train=False),
            model.apply(v, x, train=True, rngs={"dropout": jax.random.key(2)}))

  (e_emb, e_aux), (t_emb, t_aux) = run(x)
  e1, t1 = np.asarray(e_aux["hidden_1"]), np.asarray(t_aux["hidden_1"])
  assert e1.shape == (16, 32)
  active = e1 > 0
  ratio = t1[active] / e1[active]
  np.testing.assert_allclose(np.sort(np.unique(np.round(ratio, 5))), [0, 2])
  # MMNN's Dropout1d bug would zero whole rows; here rows are mixed.
  kept = np.where(active, t1 > 0, False)
  mixed = [r for r in range(16) if kept[r].any() and (active[r] & ~kept[r]).any()]
  assert len(mixed) >= 8
  assert e_emb.shape == (16, 12) and np.any(e_emb < 0)  # No final ReLU.


def test_clinical_mlp_errors():
  with pytest.raises(ValueError, match=r"\[batch, n_clinical\]"):
    ClinicalMLP().init(jax.random.key(0), jnp.ones((2, 3, 11)), train=False)
  with pytest.raises(ValueError, match="norm must be one of"):
    ClinicalMLP(norm="group").init(jax.random.key(0), jnp.ones((2, 11)),
                                   train=False)


# ---------------------------------------------------------------------- MMNN


@functools.partial(_fast_jit, static_argnums=(0, 5))
def _apply_mm(model, variables, image, clinical, rng, train):
  (out, aux), upd = model.apply(variables, image, clinical, train=train,
                                rngs={"dropout": rng}, mutable=["batch_stats"])
  return out, aux, upd


@functools.partial(_fast_jit, static_argnums=(0,))
def _init_and_eval_mm(model, image, clinical):
  """Init + eval-mode apply in one program (one compile instead of two)."""
  variables = model.init(jax.random.key(0), image, clinical, train=False)
  out, aux = model.apply(variables, image, clinical, train=False)
  return variables, out, aux


def _dense(p, x):
  return np.asarray(x) @ np.asarray(p["kernel"]) + np.asarray(p["bias"])


def test_mmnn_multimodal_outputs(volumes):
  # Dict/list config (as from a config file) is frozen, so the module hashes.
  model = MMNN(image_kwargs=dict(TINY, block_config=[1, 1]),
               modalities=["image", "clinical"])
  assert hash(model) == hash(MMNN(image_kwargs=TINY))
  clin = jax.random.normal(jax.random.key(7), (2, N_CLIN))
  variables = _init(model, volumes, clin)
  assert set(variables["params"]) == {"image_encoder", "clinical_encoder",
                                      "mm_head", "image_head", "clinical_head"}
  # Train mode: the heads are linear in the (dropped-out) embeddings either
  # way, and both encoders' BatchNorm statistics must update.
  out, aux, upd = _apply_mm(model, variables, volumes, clin,
                            jax.random.key(0), True)
  assert set(upd["batch_stats"]) == {"image_encoder", "clinical_encoder"}
  assert set(out) == {"mm", "image", "clinical"}
  for v in out.values():
    assert v.shape == (2, 2) and v.dtype == jnp.float32
    assert np.all(np.isfinite(v))
  assert aux["fused"].shape == (2, 24)
  assert aux["image"]["last_dense_block"].shape == (2, 2, 2, 2, 10)
  p = variables["params"]
  fused = np.concatenate([aux["image_embedding"], aux["clinical_embedding"]], 1)
  np.testing.assert_allclose(aux["fused"], fused)
  np.testing.assert_allclose(out["mm"], _dense(p["mm_head"], fused),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(
      out["image"], _dense(p["image_head"], aux["image_embedding"]),
      rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(
      out["clinical"], _dense(p["clinical_head"], aux["clinical_embedding"]),
      rtol=1e-5, atol=1e-6)


def test_mmnn_image_only(volumes):
  model = MMNN(modalities=("image",), image_kwargs=TINY, n_outcomes=3)
  variables, out, aux = _init_and_eval_mm(model, volumes, None)
  assert set(variables["params"]) == {"image_encoder", "image_head"}
  assert set(out) == {"mm"} and out["mm"].shape == (2, 3)
  np.testing.assert_allclose(
      out["mm"], _dense(variables["params"]["image_head"],
                        aux["image_embedding"]), rtol=1e-5, atol=1e-6)


def test_mmnn_clinical_only_ignores_image():
  model = MMNN(modalities=("clinical",), clinical_kwargs=dict(norm="layer"))
  clin = jax.random.normal(jax.random.key(8), (5, N_CLIN))
  variables, out, aux = _init_and_eval_mm(model, jnp.zeros((3, 4)), clin)
  assert set(variables["params"]) == {"clinical_encoder", "clinical_head"}
  assert set(out) == {"mm"} and out["mm"].shape == (5, 2)
  np.testing.assert_allclose(
      out["mm"], _dense(variables["params"]["clinical_head"],
                        aux["clinical_embedding"]), rtol=1e-5, atol=1e-6)


def test_mmnn_errors(volumes):
  clin = jnp.ones((3, N_CLIN))
  init = lambda m, i, c: m.init(jax.random.key(0), i, c, train=False)
  with pytest.raises(ValueError, match="needs a 'clinical' input"):
    init(MMNN(image_kwargs=TINY), volumes, None)
  with pytest.raises(ValueError, match="batch sizes differ"):
    init(MMNN(image_kwargs=TINY), volumes, clin)
  with pytest.raises(ValueError, match="modalities must be"):
    init(MMNN(modalities=("image", "omics")), volumes, clin)
  with pytest.raises(ValueError, match="modalities must be"):
    init(MMNN(modalities=("clinical", "clinical")), None, clin)
