"""Tests for jaxsurv.gradcam: the Grad-CAM formula, localisation on a toy model
whose answer is known, the MMNN hooks, and the NIfTI/PNG writers.

References are independent of the code under test: a numpy transcription of
Selvaraju et al. (2017) eqs. 1-2, hand-computed half-voxel trilinear weights,
finite differences of the model for the channel weights, and nibabel's reading
of the source scan's affine.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from jaxsurv import gradcam
from jaxsurv.data import mri
from jaxsurv.models import MMNN


def _numpy_grad_cam(a, g):
  """Selvaraju et al. 2017 eqs. 1-2 in numpy, normalised by the maximum (no resize)."""
  w = g.mean(axis=(2, 3, 4))  # [K, B, C]
  cam = np.maximum(np.einsum("kbc,bdhwc->bkdhw", w, a), 0.0)
  peak = cam.max(axis=(2, 3, 4))
  norm = np.where(peak[..., None, None, None] > 0,
                  cam / np.where(peak > 0, peak, 1)[..., None, None, None], 0.0)
  return norm, peak, np.swapaxes(w, 0, 1)


def test_formula_matches_numpy_reference():
  rng = np.random.default_rng(0)
  a = rng.normal(size=(2, 3, 4, 5, 3)).astype(np.float32)
  g = rng.normal(size=(2, 2, 3, 4, 5, 3)).astype(np.float32)
  # Patient 1, outcome 1: positive activations, negative gradients, so every
  # weight and every voxel of eq. 2 is negative.
  a[1] = np.abs(a[1])
  g[1, 1] = -np.abs(g[1, 1])
  res = gradcam.grad_cam_from_gradients(a, g, (3, 4, 5))
  cam, peak, w = _numpy_grad_cam(a, g)
  np.testing.assert_allclose(res.weights, w, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(res.peak, peak, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(res.cam, cam, rtol=1e-5, atol=1e-6)
  # No positive evidence anywhere: an all-zero map with peak 0, not NaN.
  assert float(res.peak[1, 1]) == 0.0 and not np.any(np.asarray(res.cam[1, 1]))
  assert np.all(np.asarray(res.cam) >= 0) and np.all(np.asarray(res.cam) <= 1 + 1e-6)
  for b in range(2):
    for k in range(2):
      if float(res.peak[b, k]) > 0:
        assert float(np.max(res.cam[b, k])) == pytest.approx(1.0, abs=1e-6)
  with pytest.raises(ValueError, match="same layer"):
    gradcam.grad_cam_from_gradients(a, g[:, :, :2], (3, 4, 5))


def test_upsampling_is_half_voxel_trilinear_along_each_axis():
  # A 2-voxel layer map [0, 1] along one axis, upsampled x2: output voxel j
  # sits at layer coordinate (j + 0.5) / 2 - 0.5 = -0.25, 0.25, 0.75, 1.25,
  # so (clamped at the ends) the values are 0, 0.25, 0.75, 1.
  expected = np.array([0.0, 0.25, 0.75, 1.0])
  for axis in range(3):
    shape = [1, 1, 1]
    shape[axis] = 2
    a = np.arange(2, dtype=np.float32).reshape(shape)[None, ..., None]  # [1, ..., 1 channel]
    g = np.ones((1,) + a.shape, np.float32)
    out = [1, 1, 1]
    out[axis] = 4
    res = gradcam.grad_cam_from_gradients(a, g, tuple(out))
    np.testing.assert_allclose(np.asarray(res.cam[0, 0]).reshape(-1), expected, atol=1e-6)


class _Toy(nn.Module):
  """Risk of outcome k = mean of ReLU(feature k) over a fixed box R_k of the layer.

  ``features`` is a stride-2 2^3 convolution (set to a per-channel average by
  the test), so the layer is 8^3 for a 16^3 input and channel k sees input
  channel k only.
  """
  regions: tuple

  @nn.compact
  def __call__(self, x):
    a = nn.Conv(2, (2, 2, 2), strides=(2, 2, 2), padding="VALID", use_bias=False,
                name="features")(x)
    a = nn.relu(a)
    risks = []
    for k, (d, h, w) in enumerate(self.regions):
      m = np.zeros(a.shape[1:4], np.float32)
      m[d, h, w] = 1.0
      risks.append(jnp.sum(a[..., k] * m, axis=(1, 2, 3)) / m.sum())
    return jnp.stack(risks, axis=-1)  # [batch, 2]


# Input-space boxes (D, H, W), off-centre and asymmetric so that swapped or
# flipped axes would miss them; layer boxes are the same at stride 2.
_R_IN = ((slice(2, 6), slice(4, 10), slice(8, 14)), (slice(10, 14), slice(2, 6), slice(2, 6)))
_R_LAYER = tuple(tuple(slice(s.start // 2, s.stop // 2) for s in r) for r in _R_IN)


def _toy_inputs():
  rng = np.random.default_rng(1)
  x = 0.1 * rng.normal(size=(2, 16, 16, 16, 2)).astype(np.float32)
  for k, r in enumerate(_R_IN):
    x[(slice(None),) + r + (k,)] += np.array([1.0, 2.5], np.float32)[:, None, None, None]
  model = _Toy(regions=_R_LAYER)
  v = model.init(jax.random.key(0), jnp.asarray(x))
  kernel = np.zeros((2, 2, 2, 2, 2), np.float32)
  kernel[..., 0, 0] = kernel[..., 1, 1] = 1 / 8  # Average pool, channel k -> k.
  v = {"params": {"features": {"kernel": jnp.asarray(kernel)}}}
  return model, v, x


def test_toy_model_heat_map_lights_the_region_that_drives_each_outcome():
  model, v, x = _toy_inputs()
  grid = (16, 16, 16)

  @jax.jit
  def maps(v, x):  # One compilation for every variant below.
    full = gradcam.layer_grad_cam(model, v, x, layer="features", input_spatial=grid)
    alone = [gradcam.layer_grad_cam(model, v, x, layer="features", input_spatial=grid,
                                    score_fn=lambda out, k=k: out[:, k:k + 1]) for k in range(2)]
    single = gradcam.layer_grad_cam(model, v, x[1:], layer="features", input_spatial=grid)
    return full, alone, single

  res, alone, single = maps(v, x)
  assert res.cam.shape == (2, 2, 16, 16, 16)
  np.testing.assert_allclose(res.scores, model.apply(v, x), rtol=1e-6)
  cam = np.asarray(res.cam)
  for b in range(2):
    for k in range(2):
      inside = np.zeros(grid, bool)
      inside[_R_IN[k]] = True
      other = np.zeros(grid, bool)
      other[_R_IN[1 - k]] = True
      c = cam[b, k]
      # The driving region is hot; everything else, including the other
      # outcome's region (bright in the other channel), stays cold.
      assert c[inside].mean() > 0.6, (b, k, c[inside].mean())
      assert c[~inside].mean() < 0.1, (b, k, c[~inside].mean())
      assert c[other].max() < 0.2, (b, k, c[other].max())
      assert c[inside].mean() > 8 * c[~inside].mean()
  # Outcomes are independent: explaining one outcome alone gives the same map.
  for k in range(2):
    np.testing.assert_allclose(alone[k].cam[:, 0], res.cam[:, k], atol=1e-6)
  # Each patient's map does not depend on the others in the batch.
  np.testing.assert_allclose(single.cam[0], res.cam[1], atol=1e-6)


def test_layer_errors_name_the_layer():
  model, v, x = _toy_inputs()
  with pytest.raises(ValueError, match="'nope' did not run"):
    gradcam.layer_grad_cam(model, v, x, layer="nope", input_spatial=(16, 16, 16))
  with pytest.raises(ValueError, match="module path"):
    gradcam.layer_grad_cam(model, v, x, layer="", input_spatial=(16, 16, 16))


def _tiny_mmnn(**kw):
  image = dict(init_features=4, growth_rate=2, block_config=(1, 1), bn_size=2, stem_kernel=3,
               dropout_rate=0.2, head_dropout_rate=0.2)
  return MMNN(n_outcomes=2, image_kwargs=image, clinical_kwargs=dict(hidden_sizes=(8,)), **kw)


def _mmnn_setup():
  model = _tiny_mmnn()
  x = jax.random.normal(jax.random.key(1), (3, 16, 16, 16, 2))
  c = jax.random.normal(jax.random.key(2), (3, 5))
  v = model.init(jax.random.key(0), x, c, train=False)
  # Non-trivial running statistics, so eval-mode BatchNorm is not an identity.
  keys = iter(jax.random.split(jax.random.key(3), 64))
  stats = jax.tree_util.tree_map_with_path(
      lambda p, s: (s + 0.1 * jax.random.normal(next(keys), s.shape) if p[-1].key == "mean"
                    else s * (1 + 0.5 * jax.random.uniform(next(keys), s.shape))),
      v["batch_stats"])
  return model, {"params": v["params"], "batch_stats": stats}, x, c


def test_mmnn_hooks_agree_and_weights_match_finite_differences():
  model, v, x, c = _mmnn_setup()
  hooked = model.clone(image_kwargs={**dict(model.image_kwargs), "perturb_last_block": True})
  shape = model.apply(v, x, c, train=False)[1]["image"]["last_dense_block"].shape
  n_vox = shape[1] * shape[2] * shape[3]
  eps = 1e-3

  @jax.jit
  def everything(v, x, c):  # One compilation for every variant below.
    res = gradcam.mmnn_grad_cam(model, v, x, c)  # Default: the perturbation variable.
    others = [gradcam.mmnn_grad_cam(model, v, x, c, layer=layer)
              for layer in ("block_2", "image_encoder/block2_layer1")]
    alone = gradcam.mmnn_grad_cam(model, v, x[2:], c[2:])
    img = gradcam.mmnn_grad_cam(model, v, x, c, head="image")
    out = model.apply(v, x, c, train=False)[0]

    def shifted(delta):  # Log-hazards with the last dense block shifted by delta.
      return hooked.apply({**v, "perturbations": {"image_encoder": {"last_dense_block": delta}}},
                          x, c, train=False)[0]["mm"]
    deltas = eps * jnp.eye(shape[-1])[:, None, None, None, None, :] * jnp.ones(shape)
    fd = (jax.lax.map(shifted, deltas) - jax.lax.map(shifted, -deltas)) / (2 * eps * n_vox)
    return res, others, alone, img, out, fd  # fd: [channels, batch, outcomes]

  res, others, alone, img, out, fd = everything(v, x, c)
  assert res.cam.shape == (3, 2, 16, 16, 16)
  np.testing.assert_allclose(res.scores, out["mm"], rtol=1e-6)
  assert float(jnp.min(jnp.abs(res.weights).sum(-1))) > 0  # Every patient has a gradient.
  # The same layer through the generic interceptor (block_2 = last dense layer
  # of the last block = the last dense block's output).
  for other in others:
    np.testing.assert_allclose(other.cam, res.cam, atol=1e-6)
    np.testing.assert_allclose(other.weights, res.weights, rtol=1e-5, atol=1e-7)
  # alpha_kc = mean_v dS_k/dA_c(v) = (1/N) dS_k/d(uniform shift of channel c):
  # central differences through the model's own perturbation variable.
  np.testing.assert_allclose(res.weights, np.moveaxis(np.asarray(fd), 0, -1), rtol=3e-2,
                             atol=3e-5)
  # Per patient: a patient alone gets the same map as inside the batch.
  np.testing.assert_allclose(alone.cam[0], res.cam[2], atol=1e-6)
  np.testing.assert_allclose(img.scores, out["image"], rtol=1e-6)


def test_mmnn_errors():
  model, v, x, c = _mmnn_setup()
  with pytest.raises(ValueError, match="block_1..block_2"):
    gradcam.mmnn_grad_cam(model, v, x, c, layer="block_3")
  with pytest.raises(ValueError, match="'clinical_only' is not an output"):
    gradcam.mmnn_grad_cam(model, v, x, c, head="clinical_only")
  clin = MMNN(n_outcomes=2, modalities=("clinical",), clinical_kwargs=dict(hidden_sizes=(8,)))
  vc = clin.init(jax.random.key(0), None, c, train=False)
  with pytest.raises(ValueError, match="needs an image branch"):
    gradcam.mmnn_grad_cam(clin, vc, x, c)


# ----------------------------------------------------------------------------
# Writing back onto the original scan.
# ----------------------------------------------------------------------------


def _write_scan(tmp_path):
  """An anisotropic scan with permuted, flipped axes and a tumour box, as NIfTI."""
  shape = (40, 36, 14)  # i, j, k
  affine = np.array([[0.0, -1.5, 0.0, 40.0],   # j runs towards -x (R)
                     [1.2, 0.0, 0.0, -30.0],   # i runs towards +y (A)
                     [0.0, 0.0, 4.0, -20.0],
                     [0.0, 0.0, 0.0, 1.0]])
  rng = np.random.default_rng(0)
  img = (100 + 10 * rng.normal(size=shape)).astype(np.float32)
  mask = np.zeros(shape, np.uint8)
  mask[22:30, 8:15, 5:9] = 1
  img[mask > 0] += 80 + 20 * rng.normal(size=int(mask.sum()))
  nib.save(nib.Nifti1Image(img, affine), tmp_path / "scan.nii.gz")
  nib.save(nib.Nifti1Image(mask, affine), tmp_path / "mask.nii.gz")
  return tmp_path / "scan.nii.gz", tmp_path / "mask.nii.gz", affine, mask


def test_nifti_heat_map_has_the_source_affine_and_lands_on_the_tumour(tmp_path):
  scan, mask_path, affine, mask = _write_scan(tmp_path)
  case = mri.preprocess_case([scan, scan], mask_path,
                             mri.PreprocessConfig(grid=(16, 16, 16), spacing_mm=1.0, margin_mm=8.0))
  heat = case.mask.astype(np.float32)  # A map that is hot exactly on the tumour.
  out = tmp_path / "out" / "gradcam_os.nii.gz"
  gradcam.save_heatmap_nifti(heat, case, out)
  src, got = nib.load(scan), nib.load(out)
  assert got.shape == src.shape
  np.testing.assert_allclose(got.affine, src.affine, atol=1e-4)
  data = got.get_fdata()
  assert np.all(np.isfinite(data)) and data.min() >= 0 and data.max() <= 1 + 1e-6
  # The heat's centre of mass lies on the tumour's centre (in mm, via the affine).
  ijk = np.argwhere(data > 0.5)
  hot_mm = nib.affines.apply_affine(affine, ijk.mean(0))
  tumour_mm = nib.affines.apply_affine(affine, np.argwhere(mask).mean(0))
  assert np.linalg.norm(hot_mm - tumour_mm) < 2.0, (hot_mm, tumour_mm)
  assert data[mask > 0].mean() > 0.7 and data[mask == 0].mean() < 0.05
  with pytest.raises(ValueError, match="expected shape"):
    gradcam.save_heatmap_nifti(np.zeros((8, 8, 8)), case, tmp_path / "bad.nii.gz")


def test_overlay_png(tmp_path):
  import matplotlib.image as mpimg
  scan, mask_path, _, _ = _write_scan(tmp_path)
  image = sitk.ReadImage(str(scan), sitk.sitkFloat32)
  mask = sitk.ReadImage(str(mask_path))
  heat = sitk.Cast(mask, sitk.sitkFloat32)
  png = gradcam.save_overlay_png(image, heat, tmp_path / "o" / "x.png", mask=mask, title="t")
  pixels = mpimg.imread(png)
  assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 300
  small = sitk.Image([4, 4, 4], sitk.sitkFloat32)
  with pytest.raises(ValueError, match="share one grid"):
    gradcam.save_overlay_png(image, small, tmp_path / "y.png")
