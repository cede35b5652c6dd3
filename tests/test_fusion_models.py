"""Tests for the fusion model zoo: SNN/AlphaDropout, AttentionMIL, HEALNet,
CM-MMF and the fusion baselines (jaxsurv.models.{snn,mil,healnet,fusion}).

Tiny shapes; every model call is jitted once per configuration so the file
stays fast on a loaded CPU. References are hand computations in numpy from
the parameters (CM-MMF attention, HEALNet with no modality, Fourier features,
L1), unpadded/subset inputs for masks, and garbage-substitution for missing
modalities.
"""

import functools
import zlib

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsurv.models import fusion as F
from jaxsurv.models import healnet as H
from jaxsurv.models.mil import AttentionMIL, masked_softmax
from jaxsurv.models.snn import (SELU_ALPHA_PRIME, SNN, AlphaDropout,
                                alpha_dropout_affine)

B, N_TILES, D_TILE, N_RNA, N_CLIN = 4, 5, 6, 7, 3
MODS = (("rna", "tabular"), ("clinical", "tabular"), ("wsi", "bag"))
SMALL_ENC = dict(embed_dim=8, snn_hidden=(8,), mil_fc_dim=8, mil_attn_dim=4)
SMALL_HEAL = dict(depth=2, num_latents=3, latent_dim=8, cross_heads=2,
                  cross_dim_head=4, latent_heads=2, latent_dim_head=4)


# Per-function XLA options (as tests/test_models.py): several times faster
# compiles of these tiny models on CPU; run time is irrelevant here.
_fast_jit = functools.partial(jax.jit, compiler_options={
    "xla_backend_optimization_level": 0,
    "xla_llvm_disable_expensive_passes": True})


def _n_params(tree) -> int:
  return int(sum(np.prod(a.shape) for a in jax.tree.leaves(tree)))


def _batch(seed=0, garbage=None):
  """Inputs for MODS, ``B`` patients: patient 0 misses rna, patient 1 has an
  empty bag (all tiles masked, presence True), patient 2 misses clinical,
  patient 3 has everything with 2 padded tiles (patient 0 has 1).
  ``garbage`` (a seed) fills every missing/padded slot with NaN/inf/huge
  values drawn from that seed. Returns numpy dicts ``(inputs, presence)``."""
  r = np.random.default_rng(seed)
  rna = r.normal(size=(B, N_RNA)).astype(np.float32)
  clin = r.normal(size=(B, N_CLIN)).astype(np.float32)
  wsi = r.normal(size=(B, N_TILES, D_TILE)).astype(np.float32)
  mask = np.ones((B, N_TILES), bool)
  mask[1] = False
  mask[3, 3:] = False
  mask[0, 4] = False
  presence = {"rna": np.array([0, 1, 1, 1], bool),
              "clinical": np.array([1, 1, 0, 1], bool),
              "wsi": np.ones(B, bool)}
  if garbage is not None:
    g = np.random.default_rng(garbage)
    junk = lambda shape: np.where(g.random(shape) < 0.3, np.nan,
                                  g.normal(size=shape) * 1e6).astype(np.float32)
    rna[0] = junk(N_RNA)
    rna[0, 0] = np.inf
    clin[2] = junk(N_CLIN)
    wsi[~mask] = junk((int((~mask).sum()), D_TILE))
  inputs = {"rna": rna, "clinical": clin, "wsi": wsi, "wsi_tile_mask": mask}
  return inputs, presence


def _concat(*batches):
  """Concatenates ``(inputs, presence)`` pairs along the batch axis: the
  models are row-independent, so one compiled call checks many variants."""
  inputs = {k: np.concatenate([b[0][k] for b in batches])
            for k in batches[0][0]}
  presence = {k: np.concatenate([b[1][k] for b in batches])
              for k in batches[0][1]}
  return inputs, presence


def _variants():
  """5 variants of ``_batch()`` stacked to ``[5 * B, ...]``: 0 clean,
  1 garbage in every missing slot, 2 patient 1's empty bag also flagged
  absent, 3 patient 3's rna flagged absent, 4 nothing present."""
  clean = _batch()
  garbage = _batch(garbage=123)
  inp, pres = _batch()
  v2 = (inp, dict(pres, wsi=np.array([1, 0, 1, 1], bool)))
  v3 = (inp, dict(pres, rna=np.array([0, 1, 1, 0], bool)))
  v4 = (inp, {k: np.zeros(B, bool) for k in pres})
  return _concat(clean, garbage, v2, v3, v4)


N_VARIANTS = 5


@functools.partial(_fast_jit, static_argnums=(0,))
def _init_run(model, inputs, presence):
  """Init + eval forward + train-mode gradients, one compiled program."""
  (out, aux), variables = model.init_with_output(
      {"params": jax.random.key(0)}, inputs, presence, train=False)

  def loss(params):
    out, _ = model.apply({"params": params}, inputs, presence, train=True,
                         rngs={"dropout": jax.random.key(3)})
    return jnp.sum(out ** 2)
  return variables, out, aux, jax.grad(loss)(variables["params"])


@functools.lru_cache(maxsize=None)
def _case(case):
  """Runs MODEL_CASES[case] once on ``_variants()`` (cached across tests).

  Returns ``(model, variables, out [5, B, n_out], aux, grads)``; ``aux``
  leaves are reshaped to ``[5, B, ...]``."""
  model = MODEL_CASES[case]()
  inputs, presence = _variants()
  variables, out, aux, grads = _init_run(model, inputs, presence)
  split = lambda a: np.asarray(a).reshape(N_VARIANTS, B, *a.shape[1:])
  return model, variables, split(out), jax.tree.map(split, aux), grads


# --------------------------------------------------------------- AlphaDropout


def test_alpha_dropout_affine_known_values():
  # Hand-computed from Klambauer et al. 2017 with q = 0.75 keep probability.
  ap = -1.0507009873554805 * 1.6732632423543772
  a, b = alpha_dropout_affine(0.25)
  a_ref = (0.75 + ap ** 2 * 0.75 * 0.25) ** -0.5
  np.testing.assert_allclose([a, b], [a_ref, -a_ref * 0.25 * ap], rtol=1e-12)
  np.testing.assert_allclose([a, b], [0.8672, 0.3812], atol=5e-4)
  assert alpha_dropout_affine(0.0) == (1.0, 0.0)
  with pytest.raises(ValueError, match="rate"):
    alpha_dropout_affine(1.0)


def test_alpha_dropout_keeps_selu_mean_and_variance():
  # SELU of N(0,1) is (approximately) the self-normalising fixed point:
  # mean 0, variance 1. AlphaDropout must keep both; ordinary inverted
  # dropout would blow the variance up to ~1/(1-p) = 1.33 (checked too so
  # that the test can fail).
  z = jax.random.normal(jax.random.key(0), (400_000,))
  x = jax.nn.selu(z)
  assert abs(float(x.mean())) < 0.01 and abs(float(x.var()) - 1) < 0.02
  layer = AlphaDropout(0.25)
  y = layer.apply({}, x, deterministic=False,
                  rngs={"dropout": jax.random.key(1)})
  assert abs(float(y.mean())) < 0.01
  assert abs(float(y.var()) - 1.0) < 0.02
  a, b = alpha_dropout_affine(0.25)
  dropped = np.isclose(np.asarray(y), a * SELU_ALPHA_PRIME + b, atol=1e-6)
  assert abs(dropped.mean() - 0.25) < 0.005
  inverted = jnp.where(jax.random.bernoulli(jax.random.key(1), 0.75, x.shape),
                       x / 0.75, 0.0)
  assert float(inverted.var()) > 1.2
  np.testing.assert_array_equal(layer.apply({}, x, deterministic=True), x)


def test_snn_lecun_init_and_self_normalisation():
  model = SNN(hidden_sizes=(64,) * 8, activation="selu", dropout_rate=0.1)
  x = jax.random.normal(jax.random.key(0), (4096, 400))
  params = model.init(jax.random.key(1), x, train=False)["params"]
  k0 = np.asarray(params["dense0"]["kernel"])
  assert abs(k0.std() * np.sqrt(400) - 1) < 0.02  # N(0, 1/fan_in)
  assert np.all(np.asarray(params["dense0"]["bias"]) == 0)
  y = jax.jit(lambda p, x: model.apply({"params": p}, x, train=True,
                                       rngs={"dropout": jax.random.key(2)})
              )(params, x)
  assert y.shape == (4096, 64)
  # 8 SELU + AlphaDropout layers at LeCun init keep activations normalised.
  assert abs(float(y.mean())) < 0.15 and abs(float(y.var()) - 1) < 0.25
  with pytest.raises(ValueError, match="activation"):
    SNN(activation="relu").init(jax.random.key(0), x[:2], train=False)


# --------------------------------------------------------------- AttentionMIL


def test_masked_softmax_matches_softmax_over_valid_entries():
  s = jnp.array([[1.0, 2.0, jnp.nan, 0.5], [3.0, 1.0, 2.0, 4.0],
                 [1.0, 1.0, 1.0, 1.0]])
  m = jnp.array([[1, 1, 0, 1], [0, 1, 0, 0], [0, 0, 0, 0]], bool)
  w = np.asarray(masked_softmax(s, m))
  ref0 = np.exp([1.0, 2.0, 0.5]) / np.exp([1.0, 2.0, 0.5]).sum()
  np.testing.assert_allclose(w[0, [0, 1, 3]], ref0, rtol=1e-6)
  np.testing.assert_array_equal(w[0, 2], 0)
  np.testing.assert_array_equal(w[1], [0, 1, 0, 0])
  np.testing.assert_array_equal(w[2], 0)


def _mil_reference(params, x, mask):
  """AttentionMIL eval forward by hand in numpy (Ilse et al. eq. 9)."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  dense = lambda d, v: v @ d["kernel"] + d["bias"]
  h = np.maximum(dense(p["fc"], x), 0)
  a = np.tanh(dense(p["attention"]["V"], h))
  g = 1 / (1 + np.exp(-dense(p["attention"]["U"], h)))
  scores = dense(p["attention"]["w"], a * g)[..., 0]
  att = np.zeros_like(scores)
  emb = []
  for b in range(x.shape[0]):
    valid = mask[b]
    e = np.exp(scores[b, valid] - scores[b, valid].max())
    att[b, valid] = e / e.sum()
    emb.append(np.maximum(dense(p["rho"], att[b] @ h[b]), 0))
  return np.stack(emb), att


def test_attention_mil_matches_reference_and_ignores_padding():
  model = AttentionMIL(fc_dim=8, attn_dim=4, out_dim=5)
  r = np.random.default_rng(0)
  x = r.normal(size=(2, 6, 3)).astype(np.float32)
  mask = np.array([[1, 1, 1, 1, 0, 0], [1, 0, 1, 0, 1, 0]], bool)
  x_garbage = x.copy()
  x_garbage[~mask] = np.nan
  perm = np.array([3, 1, 0, 2, 5, 4])

  @_fast_jit
  def run(x, m):
    params = model.init(jax.random.key(0), x, m, train=False)
    return params, model.apply(params, x, m, train=False)
  # Variants in one call: garbage padding, permuted tiles, an empty bag.
  xs = np.concatenate([x_garbage, x[:, perm], x[:1]])
  ms = np.concatenate([mask, mask[:, perm], np.zeros_like(mask[:1])])
  params, (emb, att) = run(xs, ms)
  emb, att = np.asarray(emb), np.asarray(att)
  assert emb.shape == (5, 5) and att.shape == (5, 6)
  emb_ref, att_ref = _mil_reference(params["params"], x, mask)
  np.testing.assert_allclose(emb[:2], emb_ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(att[:2], att_ref, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(att[:2].sum(1), 1.0, rtol=1e-6)
  np.testing.assert_array_equal(att[:2][~mask], 0.0)
  # Permuting the tiles permutes the attention and leaves the embedding.
  np.testing.assert_allclose(emb[2:4], emb[:2], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(att[2:4], att[:2][:, perm], rtol=1e-5, atol=1e-7)
  # An empty bag: zero attention, finite embedding.
  np.testing.assert_array_equal(att[4], 0.0)
  assert np.all(np.isfinite(emb))


# ------------------------------------------------------------------- CM-MMF


def test_cross_modal_attention_matches_hand_computation():
  fusion = F.CrossModalAttentionFusion(attn_dim=4)
  r = np.random.default_rng(1)
  f = r.normal(size=(3, 3, 5)).astype(np.float32)
  present = np.array([[1, 1, 1], [1, 0, 1], [0, 0, 0]], bool)
  params = fusion.init(jax.random.key(0), f, present)["params"]
  fused, w = fusion.apply({"params": params}, f, present)
  V, c = np.asarray(params["V"]["kernel"]), np.asarray(params["V"]["bias"])
  wk, wb = np.asarray(params["w"]["kernel"]), np.asarray(params["w"]["bias"])
  e = (np.tanh(f @ V + c) @ wk)[..., 0] + wb[0]  # same V, w for every m
  for b in range(2):
    idx = np.flatnonzero(present[b])
    ref = np.exp(e[b, idx]) / np.exp(e[b, idx]).sum()
    np.testing.assert_allclose(np.asarray(w)[b, idx], ref, rtol=1e-5)
    np.testing.assert_allclose(fused[b], ref @ f[b, idx], rtol=1e-5,
                               atol=1e-6)
  assert np.asarray(w)[1, 1] == 0
  np.testing.assert_array_equal(w[2], 0)
  np.testing.assert_array_equal(fused[2], 0)
  # Shared weights: V and w exist once, whatever the number of modalities.
  assert set(params) == {"V", "w"}
  unshared = F.CrossModalAttentionFusion(attn_dim=4, share_weights=False)
  p2 = jax.eval_shape(lambda: unshared.init(jax.random.key(0), f, present))
  assert set(p2["params"]) == {"V0", "V1", "V2", "w0", "w1", "w2"}


# ------------------------------------------------------ all models, interface

MODEL_CASES = {
    "cmmmf": lambda: F.CMMMF(modalities=MODS, attn_dim=4, **SMALL_ENC),
    "concat": lambda: F.ConcatFusion(modalities=MODS, hidden=(8, 8),
                                     **SMALL_ENC),
    "mean": lambda: F.MeanFusion(modalities=MODS, n_out=1, **SMALL_ENC),
    "bilinear": lambda: F.BilinearFusion(modalities=MODS, scale_dim=2, mmhid=8,
                                         **SMALL_ENC),
    "porpoise": lambda: F.PorpoiseGatedLateFusion(
        modalities=MODS[::2], scale_dim=4, mmhid=8, **SMALL_ENC),
    "porpoise_concat": lambda: F.PorpoiseGatedLateFusion(
        modalities=MODS[::2], fusion="concat", mmhid=8, **SMALL_ENC),
    # Default self_per_cross_attn=1: the per-patient skip must cover it.
    "healnet": lambda: H.HEALNet(modalities=MODS[::2], ff_dropout=0.1,
                                 attn_dropout=0.1, **SMALL_HEAL),
    "unimodal_rna": lambda: F.Unimodal(modalities=(("rna", "tabular"),),
                                       n_out=1, snn_hidden=(8, 8)),
    "unimodal_wsi": lambda: F.Unimodal(modalities=(("wsi", "bag"),),
                                       mil_fc_dim=8, mil_attn_dim=4),
}


@pytest.mark.parametrize("case", sorted(MODEL_CASES))
def test_model_interface_missing_modalities_and_gradients(case):
  model, _, out, aux, grads = _case(case)
  n_out = model.n_out
  assert n_out in (1, 4)  # Cox log-hazard and 4 time bins both covered.
  assert out.shape == (N_VARIANTS, B, n_out) and out.dtype == np.float32
  assert np.all(np.isfinite(out))
  inputs, presence = _batch()
  names = [n for n, _ in model.modalities]
  # Effective presence: the all-masked bag of patient 1 counts as missing.
  for n in names:
    expected = presence[n]
    if n == "wsi":
      expected = expected & inputs["wsi_tile_mask"].any(1)
    np.testing.assert_array_equal(aux["presence"][n][0], expected)
  tol = dict(rtol=1e-6, atol=1e-7)
  # Missing modalities / padded tiles replaced by NaN, inf and huge values:
  # every patient's output is unchanged.
  np.testing.assert_allclose(out[1], out[0], **tol)
  # An empty bag with presence True == presence False.
  np.testing.assert_allclose(out[2], out[0], **tol)
  # Removing patient 3's rna changes patient 3 only.
  np.testing.assert_allclose(out[3, :3], out[0, :3], **tol)
  if "rna" in names:
    assert not np.allclose(out[3, 3], out[0, 3], rtol=1e-4)
  # Nothing present: one constant prediction, whatever the inputs.
  np.testing.assert_allclose(out[4], np.broadcast_to(out[4, :1], out[4].shape),
                             rtol=1e-5, atol=1e-6)
  # Gradients through the batch holding garbage, in training mode, are
  # finite and not all zero.
  leaves = jax.tree.leaves(grads)
  assert leaves and all(np.all(np.isfinite(np.asarray(g))) for g in leaves)
  assert any(float(jnp.abs(g).sum()) > 0 for g in leaves)
  mask = inputs["wsi_tile_mask"]
  for att in aux.get("mil_attention", {}).values():
    np.testing.assert_array_equal(att[0][~mask], 0)
    np.testing.assert_array_equal(att[0][1], 0)  # empty bag
    np.testing.assert_allclose(att[0][mask.any(1)].sum(1), 1, rtol=1e-5)
  if case == "cmmmf":
    w = aux["modality_attention"][0]
    p = np.stack([aux["presence"][n][0] for n in names], 1)
    np.testing.assert_array_equal(w[~p], 0)
    np.testing.assert_allclose(w.sum(1), 1, rtol=1e-5)
    np.testing.assert_array_equal(aux["modality_attention"][4], 0)


def test_concat_fusion_appends_presence_indicators():
  params = _case("concat")[1]["params"]
  # 3 embeddings of 8 + 3 presence indicators feed the first fusion layer.
  assert params["fusion"]["dense0"]["kernel"].shape == (3 * 8 + 3, 8)


def test_bilinear_product_width_and_limits():
  params = _case("bilinear")[1]["params"]
  # (scale_dim + 1)^3 = 27 product features for three modalities, then the
  # skip layer sees mmhid + 3 embeddings.
  assert params["fusion"]["encoder1"]["kernel"].shape == (27, 8)
  assert params["fusion"]["encoder2"]["kernel"].shape == (8 + 3 * 8, 8)
  inputs, presence = _batch()
  with pytest.raises(ValueError, match=">= 2 modalities"):
    jax.eval_shape(lambda: F.BilinearFusion(modalities=MODS[:1], **SMALL_ENC)
                   .init(jax.random.key(0), inputs, presence, train=False))
  with pytest.raises(ValueError, match="max_product_dim"):
    jax.eval_shape(lambda: F.BilinearFusion(modalities=MODS, scale_dim=64,
                                            **SMALL_ENC)
                   .init(jax.random.key(0), inputs, presence, train=False))



def _fixed_dropout_mask(name, shape, rate):
  """A deterministic inverted-dropout mask for the Dropout submodule ``name``
  (kept entries 1 / (1 - rate), dropped ones 0), the same in the model and in
  the numpy reference."""
  keep = np.random.default_rng(zlib.crc32(name.encode())).random(shape) >= rate
  return keep.astype(np.float32) / np.float32(1.0 - rate)


def _porpoise_bilinear_reference(params, embs, present, *, gate, skip,
                                 drop=lambda name, x: x):
  """PORPOISE's ``BilinearFusion.forward`` (mahmoodlab/PORPOISE
  ``models/model_utils.py``) in numpy, generalised to M modalities and to a
  missing modality's ``o_i`` = 0. ``drop(name, x)`` stands for the Dropout
  called ``name``; PORPOISE's ``nn.Sequential`` order: linear_o = Linear,
  ReLU, Dropout; post_fusion_dropout on the product; encoder1 = Linear,
  ReLU, Dropout; then the skip concatenation; encoder2 = Linear, ReLU,
  Dropout, with or without skip."""
  relu = lambda x: np.maximum(x, 0.0)
  dense = lambda name, x: (x @ np.asarray(params[name]["kernel"])
                           + np.asarray(params[name]["bias"]))
  v_all = np.concatenate(embs, axis=-1)
  batch = v_all.shape[0]
  prod = np.ones((batch, 1), np.float32)
  for i, v in enumerate(embs):
    h = relu(dense(f"h{i}", v))
    if gate:
      h = h / (1.0 + np.exp(-dense(f"z{i}", v_all)))
    o = drop(f"o{i}_dropout", relu(dense(f"o{i}", h)))
    o = o * present[:, i:i + 1]
    o = np.concatenate([o, np.ones((batch, 1), np.float32)], axis=-1)
    prod = np.einsum("bi,bj->bij", prod, o).reshape(batch, -1)
  out = drop("post_fusion_dropout", prod)
  out = drop("encoder1_dropout", relu(dense("encoder1", out)))
  if skip:
    out = np.concatenate([out, v_all], axis=-1)
  return drop("encoder2_dropout", relu(dense("encoder2", out)))


@pytest.mark.parametrize("skip,gate", [(False, True), (True, True),
                                       (False, False)])
def test_gated_kronecker_fusion_matches_porpoise_bilinear_fusion(skip, gate):
  # PORPOISE always applies encoder2 after encoder1 (only its input width
  # depends on skip) and has dropout after encoder1 and encoder2; the old
  # module skipped encoder2 without skip and had neither dropout.
  d1, d2, scale, mmhid, rate = 5, 7, 3, 6, 0.5
  r = np.random.default_rng(3)
  embs = [r.normal(size=(4, d1)).astype(np.float32),
          r.normal(size=(4, d2)).astype(np.float32)]
  present = np.array([[1, 1], [1, 0], [0, 1], [1, 1]], bool)
  embs[1][1] = 0.0  # Missing embeddings arrive as 0.
  embs[0][2] = 0.0
  fusion = F.GatedKroneckerFusion(scale_dim=scale, mmhid=mmhid, gate=gate,
                                  skip=skip, dropout_rate=rate)
  params = fusion.init(jax.random.key(1), embs, present, train=False)["params"]
  # Non-zero biases so that the position of every layer matters.
  params = jax.tree.map(
      lambda a: a + 0.1 * r.normal(size=a.shape).astype(np.float32), params)
  assert set(params) == ({"h0", "h1", "o0", "o1", "encoder1", "encoder2"}
                         | ({"z0", "z1"} if gate else set()))
  assert params["encoder1"]["kernel"].shape == ((scale + 1) ** 2, mmhid)
  assert params["encoder2"]["kernel"].shape == (
      (mmhid + d1 + d2 if skip else mmhid), mmhid)

  got = np.asarray(fusion.apply({"params": params}, embs, present,
                                train=False))
  want = _porpoise_bilinear_reference(params, embs, present.astype(np.float32),
                                      gate=gate, skip=skip)
  assert got.shape == (4, mmhid)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

  # Training: every Dropout gets a fixed mask, so the module's dropout
  # positions must be PORPOISE's for the outputs to agree.
  called = []

  def fixed_dropout(next_fun, args, kwargs, context):
    if not isinstance(context.module, flax.linen.Dropout):
      return next_fun(*args, **kwargs)
    assert kwargs["deterministic"] is False
    name = context.module.name
    called.append(name)
    x = args[0]
    return x * _fixed_dropout_mask(name, x.shape, rate)

  with flax.linen.intercept_methods(fixed_dropout):
    got_train = np.asarray(fusion.apply(
        {"params": params}, embs, present, train=True,
        rngs={"dropout": jax.random.key(2)}))
  assert sorted(called) == sorted(["o0_dropout", "o1_dropout",
                                   "post_fusion_dropout", "encoder1_dropout",
                                   "encoder2_dropout"])
  want_train = _porpoise_bilinear_reference(
      params, embs, present.astype(np.float32), gate=gate, skip=skip,
      drop=lambda name, x: x * _fixed_dropout_mask(name, x.shape, rate))
  np.testing.assert_allclose(got_train, want_train, rtol=1e-5, atol=1e-5)
  assert not np.allclose(got_train, got)  # The masks did change the output.

  # The same layer in the PORPOISE model, whose fusion is this module.
  inputs, presence = _batch()
  shapes = jax.eval_shape(lambda: F.PorpoiseGatedLateFusion(
      modalities=MODS[:2], skip=skip, gate=gate, scale_dim=scale, mmhid=mmhid,
      **SMALL_ENC).init(jax.random.key(0), inputs, presence, train=False))
  assert shapes["params"]["fusion"]["encoder2"]["kernel"].shape == (
      (mmhid + 2 * SMALL_ENC["embed_dim"] if skip else mmhid), mmhid)

def test_interface_errors():
  inputs, presence = _batch()
  model = F.MeanFusion(modalities=MODS, **SMALL_ENC)
  init = lambda m, i, p: jax.eval_shape(
      lambda: m.init(jax.random.key(0), i, p, train=False))
  bad = dict(inputs)
  del bad["wsi_tile_mask"]
  with pytest.raises(ValueError, match="wsi_tile_mask"):
    init(model, bad, presence)
  with pytest.raises(ValueError, match="presence is missing modality 'rna'"):
    init(model, inputs, {k: v for k, v in presence.items() if k != "rna"})
  with pytest.raises(ValueError, match=r"inputs\['rna'\].*\[batch, features\]"):
    init(model, dict(inputs, rna=inputs["rna"][..., None]), presence)
  with pytest.raises(ValueError, match="batch size 3"):
    init(model, dict(inputs, clinical=inputs["clinical"][:3]), presence)
  with pytest.raises(ValueError, match="kind must be one of"):
    F.MeanFusion(modalities=(("rna", "image"),))
  with pytest.raises(ValueError, match="unique"):
    F.MeanFusion(modalities=(("rna", "tabular"), ("rna", "bag")))
  with pytest.raises(ValueError, match="spatial_axes names must be bag"):
    init(H.HEALNet(modalities=MODS, spatial_axes=(("rna", 2),), **SMALL_HEAL),
         inputs, presence)
  with pytest.raises(ValueError, match="weight_sharing"):
    init(H.HEALNet(modalities=MODS, weight_sharing="odd", **SMALL_HEAL),
         inputs, presence)


# ------------------------------------------------------------------ HEALNet


def _healnet(**kw):
  return H.HEALNet(**{**dict(modalities=MODS, **SMALL_HEAL), **kw})


def test_healnet_equals_model_without_the_missing_modality():
  # Patient 0 misses rna; a HEALNet built without rna, sharing every other
  # parameter, must give patient 0 the same output (the skipped step covers
  # cross-attention, feed-forward and the following self-attention).
  full, variables, out, _, _ = _case("healnet")
  assert full.self_per_cross_attn == 1
  reduced = H.HEALNet(**{**{f: getattr(full, f) for f in (
      "depth", "num_latents", "latent_dim", "cross_heads", "cross_dim_head",
      "latent_heads", "latent_dim_head", "ff_dropout", "attn_dropout")},
      "modalities": MODS[2:]})
  params = flax.core.unfreeze(variables["params"])
  reduced_params = {k: v for k, v in params.items() if not k.endswith("_rna")}
  inputs, presence = _batch()
  shapes = jax.eval_shape(lambda: reduced.init(jax.random.key(0), inputs,
                                               presence, train=False))
  assert jax.tree.map(lambda a: a.shape, shapes["params"]) == jax.tree.map(
      lambda a: a.shape, reduced_params)
  out_r, _ = _fast_jit(lambda p, i, q: reduced.apply(
      {"params": p}, i, q, train=False))(reduced_params, inputs, presence)
  np.testing.assert_allclose(out_r[0], out[0, 0], rtol=1e-5, atol=1e-6)
  assert not np.allclose(out_r[3], out[0, 3])  # Patient 3 has rna: it matters.


def test_healnet_no_modality_is_head_of_learned_latents():
  _, variables, out, aux, _ = _case("healnet")
  p = variables["params"]
  pooled = np.asarray(p["latents"], np.float64).mean(0)
  ln = (pooled - pooled.mean()) / np.sqrt(pooled.var() + 1e-5)
  ln = ln * np.asarray(p["head_norm"]["scale"]) + np.asarray(
      p["head_norm"]["bias"])
  ref = ln @ np.asarray(p["head"]["kernel"]) + np.asarray(p["head"]["bias"])
  np.testing.assert_allclose(out[4], np.broadcast_to(ref, out[4].shape),
                             rtol=1e-5, atol=1e-6)
  for a in aux["attention"].values():
    np.testing.assert_array_equal(a[4], 0)


def test_healnet_attention_weights():
  _, _, _, aux, _ = _case("healnet")
  att = {k: v[0] for k, v in aux["attention"].items()}
  assert sorted(att) == [f"layer{i}/{m}" for i in range(2)
                         for m in ("rna", "wsi")]
  wsi = att["layer1/wsi"]
  assert wsi.shape == (B, 2, 3, N_TILES)  # [batch, heads, latents, tokens]
  mask = _batch()[0]["wsi_tile_mask"]
  np.testing.assert_array_equal(wsi.transpose(0, 3, 1, 2)[~mask], 0)
  np.testing.assert_allclose(wsi[[0, 2, 3]].sum(-1), 1, rtol=1e-5)
  np.testing.assert_array_equal(wsi[1], 0)  # empty bag = missing
  rna = att["layer0/rna"]
  assert rna.shape == (B, 2, 3, 1)  # the whole vector is one token
  np.testing.assert_array_equal(rna[0], 0)
  np.testing.assert_allclose(rna[1:], 1, rtol=1e-6)
  assert aux["latents"].shape == (N_VARIANTS, B, 3, 8)


def test_healnet_weight_sharing_parameter_counts():
  inputs, presence = _batch()
  def count(**kw):  # Two tabular modalities keep the traces cheap.
    shapes = jax.eval_shape(lambda: _healnet(modalities=MODS[:2], **kw).init(
        jax.random.key(0), inputs, presence, train=False))
    return _n_params(shapes), shapes["params"]
  base, _ = count(depth=1)  # latents + head + one layer
  per_layer = count(depth=2)[0] - base
  assert per_layer > 0
  for sharing, depth, layers in [("none", 3, 3), ("all", 3, 1),
                                 ("perceiver", 3, 2), ("perceiver", 1, 1)]:
    assert count(depth=depth, weight_sharing=sharing)[0] == (
        base + (layers - 1) * per_layer), (sharing, depth)
  # "all" (the paper's sharing): one cross block per modality, one self
  # stack, reused by every layer.
  _, params = count(depth=3, weight_sharing="all")
  assert sorted(k for k in params if k.startswith(("cross", "self"))) == [
      "cross_0_clinical", "cross_0_rna", "self_0_0"]


def test_fourier_encode_known_values():
  enc = np.asarray(H.fourier_encode(jnp.array([[0.5, -1.0]]), num_bands=2,
                                    max_freq=6.0))
  # scales linspace(1, 3, 2) = [1, 3]; per axis [sin, sin, cos, cos, x].
  ref = []
  for x in (0.5, -1.0):
    ref += [np.sin(np.pi * x), np.sin(3 * np.pi * x), np.cos(np.pi * x),
            np.cos(3 * np.pi * x), x]
  np.testing.assert_allclose(enc[0], ref, atol=1e-6)
  assert enc.shape == (1, 10)


def test_healnet_spatial_positions():
  model = _healnet(spatial_axes=(("wsi", 2),), depth=1, self_per_cross_attn=0,
                   return_attention="mean")
  inputs, presence = _batch()
  r = np.random.default_rng(5)
  pos = r.uniform(-1, 1, size=(B, N_TILES, 2)).astype(np.float32)
  mask = inputs["wsi_tile_mask"]
  moved = pos.copy()
  moved[3, :3] = -moved[3, :3]
  perm = np.array([2, 0, 4, 1, 3])
  permuted = dict(inputs, wsi=inputs["wsi"][:, perm],
                  wsi_tile_mask=mask[:, perm])
  junk = pos.copy()
  junk[~mask] = np.nan
  batches = [(dict(inputs, wsi_positions=pos), presence),
             (dict(inputs, wsi_positions=moved), presence),
             (dict(permuted, wsi_positions=pos[:, perm]), presence),
             (dict(inputs, wsi_positions=junk), presence)]

  @_fast_jit
  def run(inputs, presence):
    variables = model.init(jax.random.key(0), inputs, presence, train=False)
    return variables, model.apply(variables, inputs, presence, train=False)
  variables, (out, aux) = run(*_concat(*batches))
  out = np.asarray(out).reshape(4, B, -1)
  # Mean attention over heads and latents: [batch, tiles], a distribution
  # over the valid tiles of present patients.
  att = np.asarray(aux["attention"]["layer0/wsi"])[:B]
  assert att.shape == (B, N_TILES) and sorted(aux["attention"]) == [
      "layer0/clinical", "layer0/rna", "layer0/wsi"]
  np.testing.assert_array_equal(att[~mask], 0)
  np.testing.assert_allclose(att[[0, 2, 3]].sum(1), 1, rtol=1e-5)
  # Context width = tile dim + 2 axes * (2 * 2 bands + 1).
  kv = variables["params"]["cross_0_wsi"]["attn"]["to_kv"]["kernel"]
  assert kv.shape[0] == D_TILE + 2 * 5
  assert not np.allclose(out[1, 3], out[0, 3])  # positions are used
  np.testing.assert_allclose(out[1, :3], out[0, :3], rtol=1e-6, atol=1e-7)
  # Permuting tiles together with their positions changes nothing; padded
  # tiles' positions are ignored.
  np.testing.assert_allclose(out[2], out[0], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out[3], out[0], rtol=1e-6, atol=1e-7)
  with pytest.raises(ValueError, match="wsi_positions"):
    jax.eval_shape(lambda: model.init(jax.random.key(0), inputs, presence,
                                      train=False))


def test_healnet_token_modes_and_early_fusion():
  inputs, presence = _batch()
  feat = _healnet(tabular_tokens="features", bag_tokens="channels", depth=1,
                  self_per_cross_attn=0)
  shapes = jax.eval_shape(lambda: feat.init(jax.random.key(0), inputs,
                                            presence, train=False))
  # Feature tokens: 1 value + 5 Fourier channels of the feature index;
  # channel tokens: n_tiles values + 5 Fourier channels.
  p = shapes["params"]
  assert p["cross_0_rna"]["attn"]["to_kv"]["kernel"].shape[0] == 1 + 5
  assert p["cross_0_wsi"]["attn"]["to_kv"]["kernel"].shape[0] == N_TILES + 5
  out, aux = jax.eval_shape(
      lambda v: feat.apply(v, inputs, presence, train=False), shapes)
  assert out.shape == (B, 4)
  assert aux["attention"]["layer0/rna"].shape == (B, 2, 3, N_RNA)
  assert aux["attention"]["layer0/wsi"].shape == (B, 2, 3, D_TILE)

  early = _healnet(early_fusion=True, depth=1, self_per_cross_attn=0)

  @_fast_jit
  def run(inputs, presence):
    variables = early.init(jax.random.key(0), inputs, presence, train=False)
    return variables, early.apply(variables, inputs, presence, train=False)
  v, (out, aux) = run(*_concat(_batch(), _batch(garbage=9)))
  assert sorted(k for k in v["params"] if k.startswith("cross")) == [
      "cross_0_early_fusion", "cross_0_wsi"]
  # One token: rna + clinical features + 2 indicators + 5 Fourier channels.
  kv = v["params"]["cross_0_early_fusion"]["attn"]["to_kv"]["kernel"]
  assert kv.shape[0] == N_RNA + N_CLIN + 2 + 5
  np.testing.assert_array_equal(aux["presence"]["early_fusion"], True)
  np.testing.assert_allclose(out[B:], out[:B], rtol=1e-6, atol=1e-7)


def test_l1_penalty_matches_numpy():
  params = _case("healnet")[1]["params"]
  leaves = jax.tree_util.tree_leaves_with_path(params)
  ref_all = sum(np.abs(np.asarray(x, np.float64)).sum() for _, x in leaves)
  ref_k = sum(np.abs(np.asarray(x, np.float64)).sum() for p, x in leaves
              if p[-1].key == "kernel")
  np.testing.assert_allclose(float(H.l1_penalty(params)), ref_all, rtol=1e-5)
  np.testing.assert_allclose(float(H.l1_penalty(params, "kernels")), ref_k,
                             rtol=1e-5)
  # "all" includes the latents, LayerNorms and biases on top of the kernels.
  extra = np.abs(np.asarray(params["latents"])).sum()
  assert float(H.l1_penalty(params)) >= ref_k + extra - 1e-3
  with pytest.raises(ValueError, match="include"):
    H.l1_penalty(params, "biases")


def test_healnet_paper_configs_build():
  inputs, presence = _batch()
  for cohort, cfg in H.PAPER_CONFIGS.items():
    cfg = {k: v for k, v in cfg.items() if k != "l1"}
    shapes = jax.eval_shape(lambda: H.HEALNet(modalities=MODS[:1], **cfg).init(
        jax.random.key(0), inputs, presence, train=False))
    assert shapes["params"]["latents"].shape == (cfg["num_latents"],
                                                 cfg["latent_dim"]), cohort
    assert not any(k.startswith("self") for k in shapes["params"])


# ------------------------------------------------------- HEALNet latent_init

_LATENT_MODS = (("clinical", "tabular"), ("rna", "tabular"))


def _latent_init_params(**kw):
  """Eager (unjitted, as the snapshot was taken) init of a small HEALNet on
  clinical (20 features) + rna (200) with ``PRNGKey(1)``."""
  model = H.HEALNet(modalities=_LATENT_MODS, depth=2, num_latents=3, latent_dim=4,
                    cross_dim_head=4, cross_heads=2, **kw)
  inputs = {"clinical": jnp.ones((2, 20)), "rna": jnp.ones((2, 200))}
  presence = {"clinical": jnp.ones(2, bool), "rna": jnp.ones(2, bool)}
  return model.init(jax.random.PRNGKey(1), inputs, presence, train=False)["params"]


def _params_sha256(params) -> str:
  import hashlib  # pylint: disable=import-outside-toplevel
  h = hashlib.sha256()
  leaves = sorted(jax.tree_util.tree_leaves_with_path(params),
                  key=lambda t: jax.tree_util.keystr(t[0]))
  for path, leaf in leaves:
    a = np.asarray(leaf)
    for part in (jax.tree_util.keystr(path), str(a.dtype), str(a.shape)):
      h.update(part.encode())
    h.update(a.tobytes())
  return h.hexdigest()


def test_healnet_latent_init_normal_is_unchanged_bit_for_bit():
  # Snapshot of this init taken before ``latent_init`` existed (jax's
  # threefry PRNG, CPU); the default and "normal" must reproduce it exactly.
  before_latents = np.array(
      [[1.6249592304229736, 0.30813068151474, 1.6613584756851196, 1.0404155254364014],
       [-1.3597630262374878, 0.46721917390823364, 0.15550972521305084,
        -0.012195099145174026],
       [-0.4606887400150299, -0.30633994936943054, 0.07403741031885147,
        -0.3433299958705902]], np.float32)
  before_sha = "ba1350a3f72d95c484a2ab11060081d38e977166f9f1a90be81a549cee605a88"
  default = _latent_init_params()
  normal = _latent_init_params(latent_init="normal")
  np.testing.assert_array_equal(np.asarray(default["latents"]), before_latents)
  assert _params_sha256(default) == before_sha
  assert _params_sha256(normal) == before_sha
  # The digest sees a one-ulp change of any leaf.
  bumped = dict(default, latents=jnp.nextafter(default["latents"], jnp.inf))
  assert _params_sha256(bumped) != before_sha


def test_healnet_latent_init_uniform():
  normal = _latent_init_params()
  uniform = _latent_init_params(latent_init="uniform")
  # Only the latents differ: every other parameter draws the same values.
  flat_n = flax.traverse_util.flatten_dict(flax.core.unfreeze(normal))
  flat_u = flax.traverse_util.flatten_dict(flax.core.unfreeze(uniform))
  assert flat_n.keys() == flat_u.keys()
  for k in flat_n:
    if k != ("latents",):
      np.testing.assert_array_equal(np.asarray(flat_u[k]), np.asarray(flat_n[k]), err_msg=k)
  assert not np.array_equal(np.asarray(uniform["latents"]), np.asarray(normal["latents"]))
  # U(0, 1): a big array to test the distribution (64 x 64 values; the sd
  # of the mean is 0.0045, of the variance about 0.0011).
  model = H.HEALNet(modalities=_LATENT_MODS, depth=1, num_latents=64, latent_dim=64,
                    cross_dim_head=4, cross_heads=1, self_per_cross_attn=0,
                    latent_init="uniform")
  inputs = {"clinical": jnp.ones((1, 20)), "rna": jnp.ones((1, 200))}
  presence = {"clinical": jnp.ones(1, bool), "rna": jnp.ones(1, bool)}
  lat = np.asarray(_fast_jit(lambda: model.init(jax.random.key(7), inputs, presence,
                                                train=False))()["params"]["latents"])
  assert lat.shape == (64, 64)
  assert lat.min() >= 0.0 and lat.max() < 1.0
  assert abs(lat.mean() - 0.5) < 0.02
  assert abs(lat.var() - 1 / 12) < 0.006
  assert lat.min() < 0.01 and lat.max() > 0.99  # fills [0, 1), not a sub-range
  # The normal init is not in [0, 1) (the test above would catch a swap).
  assert np.asarray(normal["latents"]).min() < 0.0


def test_healnet_latent_init_rejects_unknown():
  inputs, presence = _batch()
  with pytest.raises(ValueError, match="latent_init"):
    jax.eval_shape(lambda: _healnet(latent_init="zeros").init(
        jax.random.key(0), inputs, presence, train=False))
