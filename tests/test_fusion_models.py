"""Tests for the fusion model zoo: SNN/AlphaDropout, AttentionMIL, HEALNet,
CM-MMF and the fusion baselines (jaxsurv.models.{snn,mil,healnet,fusion}).

Tiny shapes; every model call is jitted once per configuration so the file
stays fast on a loaded CPU. References are hand computations in numpy from
the parameters (CM-MMF attention, HEALNet with no modality, Fourier features,
L1), unpadded/subset inputs for masks, and garbage-substitution for missing
modalities.
"""

import functools

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


def _n_params(tree) -> int:
  return int(sum(np.prod(a.shape) for a in jax.tree.leaves(tree)))


@functools.partial(jax.jit, static_argnums=(0,))
def _init(model, inputs, presence):
  return model.init({"params": jax.random.key(0)}, inputs, presence,
                    train=False)


@functools.partial(jax.jit, static_argnums=(0, 4))
def _apply(model, variables, inputs, presence, train=False):
  return model.apply(variables, inputs, presence, train=train,
                     rngs={"dropout": jax.random.key(7)})


@functools.partial(jax.jit, static_argnums=(0,))
def _grads(model, variables, inputs, presence):
  def loss(params):
    out, _ = model.apply({"params": params}, inputs, presence, train=True,
                         rngs={"dropout": jax.random.key(3)})
    return jnp.sum(out ** 2)
  return jax.grad(loss)(variables["params"])


def _batch(seed=0, garbage=None):
  """Inputs for MODS: patient 0 misses rna, patient 1 has an empty bag
  (all tiles masked, presence True), patient 2 misses clinical, patient 3
  has everything with 2 padded tiles. ``garbage`` (a seed) fills every
  missing/padded slot with NaN/inf/huge values drawn from that seed."""
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
  return ({k: jnp.asarray(v) for k, v in inputs.items()},
          {k: jnp.asarray(v) for k, v in presence.items()})


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


def test_attention_mil_masked_equals_unpadded_bag():
  model = AttentionMIL(fc_dim=8, attn_dim=4, out_dim=5)
  r = np.random.default_rng(0)
  x = r.normal(size=(2, 6, 3)).astype(np.float32)
  mask = np.array([[1, 1, 1, 1, 0, 0], [1, 0, 1, 0, 1, 0]], bool)
  x_garbage = x.copy()
  x_garbage[~mask] = np.nan
  params = model.init(jax.random.key(0), x, mask, train=False)
  apply = jax.jit(lambda x, m: model.apply(params, x, m, train=False))
  emb, att = apply(x_garbage, mask)
  assert emb.shape == (2, 5) and att.shape == (2, 6)
  np.testing.assert_allclose(np.asarray(att).sum(1), 1.0, rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(att)[~mask], 0.0)
  assert np.all(np.isfinite(np.asarray(emb)))
  for b in range(2):  # Same as the bag of valid tiles alone, no padding.
    xb = x[b][mask[b]][None]
    emb_b, att_b = model.apply(params, xb, np.ones(xb.shape[:2], bool),
                               train=False)
    np.testing.assert_allclose(emb[b], emb_b[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(att)[b][mask[b]], att_b[0],
                               rtol=1e-5, atol=1e-7)
  # Permuting the tiles permutes the attention and leaves the embedding.
  perm = np.array([3, 1, 0, 2, 5, 4])
  emb_p, att_p = apply(x[:, perm], mask[:, perm])
  np.testing.assert_allclose(emb_p, emb, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(att_p, np.asarray(att)[:, perm], rtol=1e-5,
                             atol=1e-7)
  # An empty bag: zero attention, finite embedding.
  _, att0 = apply(x, np.zeros_like(mask))
  np.testing.assert_array_equal(att0, 0.0)


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
  p2 = unshared.init(jax.random.key(0), f, present)["params"]
  assert set(p2) == {"V0", "V1", "V2", "w0", "w1", "w2"}


# ------------------------------------------------------ all models, interface

MODEL_CASES = {
    "cmmmf": lambda n_out: F.CMMMF(modalities=MODS, n_out=n_out, attn_dim=4,
                                   **SMALL_ENC),
    "concat": lambda n_out: F.ConcatFusion(modalities=MODS, n_out=n_out,
                                           hidden=(8, 8), **SMALL_ENC),
    "mean": lambda n_out: F.MeanFusion(modalities=MODS, n_out=n_out,
                                       **SMALL_ENC),
    "bilinear": lambda n_out: F.BilinearFusion(
        modalities=MODS, n_out=n_out, scale_dim=2, mmhid=8, **SMALL_ENC),
    "porpoise": lambda n_out: F.PorpoiseGatedLateFusion(
        modalities=MODS[::2], n_out=n_out, scale_dim=4, mmhid=8, **SMALL_ENC),
    "porpoise_concat": lambda n_out: F.PorpoiseGatedLateFusion(
        modalities=MODS[::2], n_out=n_out, fusion="concat", mmhid=8,
        **SMALL_ENC),
    "healnet": lambda n_out: H.HEALNet(modalities=MODS, n_out=n_out,
                                       ff_dropout=0.1, attn_dropout=0.1,
                                       **SMALL_HEAL),
    "unimodal_rna": lambda n_out: F.Unimodal(
        modalities=(("rna", "tabular"),), n_out=n_out, snn_hidden=(8, 8)),
    "unimodal_wsi": lambda n_out: F.Unimodal(
        modalities=(("wsi", "bag"),), n_out=n_out, mil_fc_dim=8,
        mil_attn_dim=4),
}


@pytest.mark.parametrize("case", sorted(MODEL_CASES))
def test_model_interface_missing_modalities_and_gradients(case):
  n_out = 1 if case in ("mean", "healnet") else 4  # Cox and time-bin heads.
  model = MODEL_CASES[case](n_out)
  inputs, presence = _batch()
  variables = _init(model, inputs, presence)
  out, aux = _apply(model, variables, inputs, presence)
  assert out.shape == (B, n_out) and out.dtype == jnp.float32
  assert np.all(np.isfinite(np.asarray(out)))
  names = [n for n, _ in model.modalities]
  # Effective presence: the all-masked bag of patient 1 counts as missing.
  for n in names:
    expected = np.asarray(presence[n])
    if n == "wsi":
      expected = expected & np.asarray(inputs["wsi_tile_mask"]).any(1)
    np.testing.assert_array_equal(aux["presence"][n], expected)
  # Missing modalities / padded tiles replaced by NaN, inf and huge values:
  # every patient's output is bit-identical.
  g_inputs, g_presence = _batch(garbage=123)
  out_g, _ = _apply(model, variables, g_inputs, g_presence)
  np.testing.assert_array_equal(out_g, out)
  # An empty bag with presence True == presence False.
  p_off = dict(presence, wsi=presence["wsi"].at[1].set(False))
  if "wsi" in names:
    np.testing.assert_array_equal(_apply(model, variables, inputs, p_off)[0],
                                  out)
  # Gradients through the garbage batch, in training mode, are finite.
  grads = _grads(model, variables, g_inputs, g_presence)
  leaves = jax.tree.leaves(grads)
  assert leaves and all(np.all(np.isfinite(np.asarray(g))) for g in leaves)
  assert any(float(jnp.abs(g).sum()) > 0 for g in leaves)
  if "wsi" in aux.get("mil_attention", {}):
    att = np.asarray(aux["mil_attention"]["wsi"])
    mask = np.asarray(inputs["wsi_tile_mask"])
    np.testing.assert_array_equal(att[~mask], 0)
    np.testing.assert_allclose(att[mask.any(1)].sum(1), 1, rtol=1e-5)
  if case == "cmmmf":
    w = np.asarray(aux["modality_attention"])
    p = np.stack([np.asarray(aux["presence"][n]) for n in names], 1)
    np.testing.assert_array_equal(w[~p], 0)
    np.testing.assert_allclose(w.sum(1), 1, rtol=1e-5)


def test_other_patients_unaffected_by_one_patients_presence():
  # Toggling patient 3's rna presence changes only patient 3's output.
  for case in ("healnet", "cmmmf", "bilinear"):
    model = MODEL_CASES[case](4 if case != "healnet" else 1)
    inputs, presence = _batch()
    variables = _init(model, inputs, presence)
    out, _ = _apply(model, variables, inputs, presence)
    p2 = dict(presence, rna=presence["rna"].at[3].set(False))
    out2, _ = _apply(model, variables, inputs, p2)
    np.testing.assert_array_equal(out2[:3], out[:3])
    assert not np.allclose(out2[3], out[3])


def test_concat_fusion_appends_presence_indicators():
  model = MODEL_CASES["concat"](4)
  inputs, presence = _batch()
  params = _init(model, inputs, presence)["params"]
  # 3 embeddings of 8 + 3 presence indicators feed the first fusion layer.
  assert params["fusion"]["dense0"]["kernel"].shape == (3 * 8 + 3, 8)


def test_bilinear_product_width_and_limits():
  model = MODEL_CASES["bilinear"](4)
  inputs, presence = _batch()
  params = _init(model, inputs, presence)["params"]
  # (scale_dim + 1)^3 = 27 product features for three modalities.
  assert params["fusion"]["encoder1"]["kernel"].shape == (27, 8)
  with pytest.raises(ValueError, match=">= 2 modalities"):
    F.BilinearFusion(modalities=MODS[:1], **SMALL_ENC).init(
        jax.random.key(0), inputs, presence, train=False)
  with pytest.raises(ValueError, match="max_product_dim"):
    F.BilinearFusion(modalities=MODS, scale_dim=64, **SMALL_ENC).init(
        jax.random.key(0), inputs, presence, train=False)


def test_interface_errors():
  inputs, presence = _batch()
  model = F.MeanFusion(modalities=MODS, **SMALL_ENC)
  bad = dict(inputs)
  del bad["wsi_tile_mask"]
  with pytest.raises(ValueError, match="wsi_tile_mask"):
    model.init(jax.random.key(0), bad, presence, train=False)
  with pytest.raises(ValueError, match="presence is missing modality 'rna'"):
    model.init(jax.random.key(0), inputs,
               {k: v for k, v in presence.items() if k != "rna"}, train=False)
  with pytest.raises(ValueError, match=r"inputs\['rna'\].*\[batch, features\]"):
    model.init(jax.random.key(0), dict(inputs, rna=inputs["rna"][..., None]),
               presence, train=False)
  with pytest.raises(ValueError, match="kind must be one of"):
    F.MeanFusion(modalities=(("rna", "image"),))
  with pytest.raises(ValueError, match="unique"):
    F.MeanFusion(modalities=(("rna", "tabular"), ("rna", "bag")))
  with pytest.raises(ValueError, match="spatial_axes names must be bag"):
    H.HEALNet(modalities=MODS, spatial_axes=(("rna", 2),), **SMALL_HEAL).init(
        jax.random.key(0), inputs, presence, train=False)


# ------------------------------------------------------------------ HEALNet


def _healnet(**kw):
  return H.HEALNet(**{**dict(modalities=MODS, n_out=4, **SMALL_HEAL), **kw})


def test_healnet_equals_model_without_the_missing_modality():
  # Patient 0 misses rna; a HEALNet built without rna, sharing every other
  # parameter, must give patient 0 the same output (the skipped step covers
  # cross-attention, feed-forward and the following self-attention).
  full = _healnet(self_per_cross_attn=1)
  inputs, presence = _batch()
  variables = _init(full, inputs, presence)
  out, _ = _apply(full, variables, inputs, presence)
  reduced = _healnet(self_per_cross_attn=1, modalities=MODS[1:])
  params = flax.core.unfreeze(variables["params"])
  reduced_params = {k: v for k, v in params.items() if not k.endswith("_rna")}
  assert set(reduced_params) == set(
      _init(reduced, inputs, presence)["params"])
  out_r, _ = _apply(reduced, {"params": reduced_params}, inputs, presence)
  np.testing.assert_allclose(out_r[0], out[0], rtol=1e-5, atol=1e-6)
  assert not np.allclose(out_r[3], out[3])  # Patient 3 has rna: it matters.


def test_healnet_no_modality_is_head_of_learned_latents():
  model = _healnet()
  inputs, presence = _batch()
  variables = _init(model, inputs, presence)
  none = {k: jnp.zeros_like(v) for k, v in presence.items()}
  out, aux = _apply(model, variables, inputs, none)
  p = variables["params"]
  pooled = np.asarray(p["latents"]).mean(0)
  ln = (pooled - pooled.mean()) / np.sqrt(pooled.var() + 1e-5)
  ln = ln * np.asarray(p["head_norm"]["scale"]) + np.asarray(
      p["head_norm"]["bias"])
  ref = ln @ np.asarray(p["head"]["kernel"]) + np.asarray(p["head"]["bias"])
  np.testing.assert_allclose(out, np.broadcast_to(ref, out.shape), rtol=1e-5,
                             atol=1e-6)
  for a in aux["attention"].values():
    np.testing.assert_array_equal(a, 0)


def test_healnet_attention_weights():
  model = _healnet()
  inputs, presence = _batch()
  variables = _init(model, inputs, presence)
  _, aux = _apply(model, variables, inputs, presence)
  att = aux["attention"]
  assert sorted(att) == [f"layer{i}/{m}" for i in range(2)
                         for m in ("clinical", "rna", "wsi")]
  wsi = np.asarray(att["layer1/wsi"])
  assert wsi.shape == (B, 2, 3, N_TILES)  # [batch, heads, latents, tokens]
  mask = np.asarray(inputs["wsi_tile_mask"])
  np.testing.assert_array_equal(wsi.transpose(0, 3, 1, 2)[~mask], 0)
  np.testing.assert_allclose(wsi[[0, 2, 3]].sum(-1), 1, rtol=1e-5)
  np.testing.assert_array_equal(wsi[1], 0)  # empty bag = missing
  rna = np.asarray(att["layer0/rna"])
  assert rna.shape == (B, 2, 3, 1)  # the whole vector is one token
  np.testing.assert_array_equal(rna[0], 0)
  np.testing.assert_allclose(rna[1:], 1, rtol=1e-6)


def test_healnet_weight_sharing_parameter_counts():
  inputs, presence = _batch()
  count = lambda **kw: _n_params(jax.eval_shape(
      lambda: _healnet(**kw).init(jax.random.key(0), inputs, presence,
                                  train=False)))
  base = count(depth=1)  # latents + head + one layer
  per_layer = count(depth=2) - base
  assert per_layer > 0
  for sharing, depth, layers in [("none", 4, 4), ("all", 4, 1),
                                 ("perceiver", 4, 2), ("perceiver", 1, 1)]:
    assert count(depth=depth, weight_sharing=sharing) == (
        base + (layers - 1) * per_layer), (sharing, depth)
  # Sharing is real reuse: the "all" model has a single cross block per
  # modality and layer 1 gets the same attention maps path as layer 0.
  shared = _healnet(depth=3, weight_sharing="all")
  params = _init(shared, inputs, presence)["params"]
  assert sorted(k for k in params if k.startswith("cross")) == [
      "cross_0_clinical", "cross_0_rna", "cross_0_wsi"]


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
  model = _healnet(spatial_axes=(("wsi", 2),), depth=1)
  inputs, presence = _batch()
  r = np.random.default_rng(5)
  pos = r.uniform(-1, 1, size=(B, N_TILES, 2)).astype(np.float32)
  variables = _init(model, dict(inputs, wsi_positions=pos), presence)
  # Context width = tile dim + 2 axes * (2 * 2 bands + 1).
  kv = variables["params"]["cross_0_wsi"]["attn"]["to_kv"]["kernel"]
  assert kv.shape[0] == D_TILE + 2 * 5
  run = lambda i, p: _apply(model, variables, dict(i, wsi_positions=p),
                            presence)[0]
  out = run(inputs, pos)
  moved = pos.copy()
  moved[3, :3] = -moved[3, :3]
  out_moved = run(inputs, moved)
  assert not np.allclose(out_moved[3], out[3])  # positions are used
  np.testing.assert_array_equal(out_moved[:3], out[:3])
  # Permuting tiles together with their positions changes nothing; padded
  # tiles' positions are ignored.
  perm = np.array([2, 0, 4, 1, 3])
  perm_inputs = dict(inputs, wsi=inputs["wsi"][:, perm],
                     wsi_tile_mask=inputs["wsi_tile_mask"][:, perm])
  np.testing.assert_allclose(run(perm_inputs, pos[:, perm]), out, rtol=1e-5,
                             atol=1e-6)
  junk = pos.copy()
  junk[~np.asarray(inputs["wsi_tile_mask"])] = np.nan
  np.testing.assert_array_equal(run(inputs, junk), out)
  with pytest.raises(ValueError, match="wsi_positions"):
    model.init(jax.random.key(0), inputs, presence, train=False)


def test_healnet_token_modes_and_early_fusion():
  inputs, presence = _batch()
  feat = _healnet(tabular_tokens="features", bag_tokens="channels", depth=1)
  v = _init(feat, inputs, presence)
  out, aux = _apply(feat, v, inputs, presence)
  assert out.shape == (B, 4)
  assert aux["attention"]["layer0/rna"].shape == (B, 2, 3, N_RNA)
  assert aux["attention"]["layer0/wsi"].shape == (B, 2, 3, D_TILE)
  # Feature tokens: 1 value + 5 Fourier channels of the feature index.
  kv = v["params"]["cross_0_rna"]["attn"]["to_kv"]["kernel"]
  assert kv.shape[0] == 1 + 5

  early = _healnet(early_fusion=True, depth=1)
  v = _init(early, inputs, presence)
  assert sorted(k for k in v["params"] if k.startswith("cross")) == [
      "cross_0_early_fusion", "cross_0_wsi"]
  # One token: rna + clinical features + 2 indicators + 5 Fourier channels.
  kv = v["params"]["cross_0_early_fusion"]["attn"]["to_kv"]["kernel"]
  assert kv.shape[0] == N_RNA + N_CLIN + 2 + 5
  out, aux = _apply(early, v, inputs, presence)
  np.testing.assert_array_equal(aux["presence"]["early_fusion"], True)
  g_inputs, g_presence = _batch(garbage=9)
  np.testing.assert_array_equal(_apply(early, v, g_inputs, g_presence)[0],
                                out)


def test_l1_penalty_matches_numpy():
  model = _healnet(depth=1)
  inputs, presence = _batch()
  params = _init(model, inputs, presence)["params"]
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
    shapes = jax.eval_shape(lambda: H.HEALNet(modalities=MODS, **cfg).init(
        jax.random.key(0), inputs, presence, train=False))
    assert shapes["params"]["latents"].shape == (cfg["num_latents"],
                                                 cfg["latent_dim"]), cohort
    assert not any(k.startswith("self") for k in shapes["params"])
