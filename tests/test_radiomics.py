"""Tests of jaxsurv.radiomics: PyRadiomics features of prepared MRI (MMNN Table 3 baselines).

References: PyRadiomics itself, called directly on SimpleITK images built
voxel by voxel here (``SetPixel`` at ``(x, y, z) = (w, h, d)``), and
hand-computed shape and first-order values of a box-shaped tumour with
anisotropic voxels.
"""

import json
import pathlib

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from jaxsurv import radiomics as rad
from jaxsurv.data.prepared import PreparedCohort
from jaxsurv.errors import UserError

CHANNELS = ("t1c", "t2fs")


def _volume(seed=0, shape=(16, 16, 16)):
  """A textured two-channel ``[D, H, W, 2]`` z-score-like volume and an ellipsoid mask."""
  rng = np.random.default_rng(seed)
  d, h, w = np.meshgrid(*(np.arange(s, dtype=np.float64) for s in shape), indexing="ij")
  c = [(s - 1) / 2 for s in shape]
  mask = (((d - c[0]) / 6.5) ** 2 + ((h - c[1]) / 5.0) ** 2 + ((w - c[2]) / 4.0) ** 2 <= 1)
  t1 = np.sin(d / 2.0) + 0.5 * np.cos(w / 1.5) + 0.3 * rng.normal(size=shape)
  t2 = 0.7 * (h - c[1]) / 4 + 0.4 * rng.normal(size=shape)
  image = np.stack([t1, t2], axis=-1).astype(np.float32)
  return image, mask.astype(np.uint8)


def _sitk_by_pixel(array, spacing_dhw, pixel_type):
  """A SimpleITK image of a ``[D, H, W]`` array, voxel by voxel: (x, y, z) = (w, h, d)."""
  dd, hh, ww = array.shape
  img = sitk.Image([ww, hh, dd], pixel_type)
  setter = img.SetPixel
  for d in range(dd):
    for h in range(hh):
      for w in range(ww):
        setter(w, h, d, array[d, h, w].item())
  img.SetSpacing([spacing_dhw[2], spacing_dhw[1], spacing_dhw[0]])
  return img


def test_extract_patient_equals_pyradiomics_called_directly():
  from radiomics import featureextractor
  image, mask = _volume()
  spacing = (1.5, 1.0, 2.0)  # (D, H, W) mm: anisotropic, so an axis mix-up changes shape values.
  ours = rad.extract_patient(image, mask, spacing, CHANNELS, patient_id="P1")
  mask_img = _sitk_by_pixel(mask, spacing, sitk.sitkUInt8)
  # PyRadiomics' defaults: every non-deprecated feature of every class, original image.
  extractor = featureextractor.RadiomicsFeatureExtractor(**rad.SETTINGS)
  n_checked = 0
  for c, ch in enumerate(CHANNELS):
    img = _sitk_by_pixel(image[..., c].astype(np.float64), spacing, sitk.sitkFloat64)
    ref = {k: float(v) for k, v in extractor.execute(img, mask_img).items()
           if k.startswith("original_")}
    assert len(ref) == 107  # 14 shape + 93 first-order and texture.
    for key, value in ref.items():
      _, cls, feat = key.split("_", 2)
      name = f"shape_{feat}" if cls == "shape" else f"{ch}_{cls}_{feat}"
      np.testing.assert_allclose(ours[name], value, rtol=1e-10, atol=1e-12, err_msg=name)
      n_checked += 1
  assert n_checked == 2 * 107  # Shape checked against both channels' runs: one mask, one shape.
  assert len(ours) == 200
  # The channels really differ (the columns are not one channel copied).
  assert ours["t1c_firstorder_Mean"] != pytest.approx(ours["t2fs_firstorder_Mean"])


def test_box_mask_hand_computed_shape_and_first_order():
  rng = np.random.default_rng(1)
  image = rng.normal(size=(10, 9, 8, 2)).astype(np.float32)
  mask = np.zeros((10, 9, 8), np.uint8)
  n_d, n_h, n_w = 6, 4, 3
  mask[2:2 + n_d, 3:3 + n_h, 1:1 + n_w] = 1
  spacing = (1.0, 2.0, 3.0)  # (D, H, W) mm.
  f = rad.extract_patient(image, mask, spacing, CHANNELS)
  voxel_mm3 = 1.0 * 2.0 * 3.0
  assert f["shape_VoxelVolume"] == pytest.approx(n_d * n_h * n_w * voxel_mm3)
  # PCA axes of the voxel-centre coordinates: per-axis variance s^2 (n^2 - 1) / 12
  # (population covariance); axis length 4 sqrt(variance).
  var = sorted(s ** 2 * (n ** 2 - 1) / 12 for s, n in zip(spacing, (n_d, n_h, n_w)))
  assert f["shape_LeastAxisLength"] == pytest.approx(4 * np.sqrt(var[0]))
  assert f["shape_MinorAxisLength"] == pytest.approx(4 * np.sqrt(var[1]))
  assert f["shape_MajorAxisLength"] == pytest.approx(4 * np.sqrt(var[2]))
  for c, ch in enumerate(CHANNELS):
    inside = image[..., c][mask > 0].astype(np.float64)
    assert f[f"{ch}_firstorder_Mean"] == pytest.approx(inside.mean(), rel=1e-9)
    assert f[f"{ch}_firstorder_Maximum"] == pytest.approx(inside.max(), rel=1e-9)
    assert f[f"{ch}_firstorder_Energy"] == pytest.approx(np.sum(inside ** 2), rel=1e-9)
    assert f[f"{ch}_firstorder_TotalEnergy"] == pytest.approx(voxel_mm3 * np.sum(inside ** 2),
                                                              rel=1e-9)


def test_feature_names_layout():
  names = rad.feature_names(CHANNELS)
  assert len(names) == len(set(names)) == 200
  assert sum(n.startswith("shape_") for n in names) == 14
  counts = {"firstorder": 18, "glcm": 24, "glrlm": 16, "glszm": 16, "gldm": 14, "ngtdm": 5}
  for ch in CHANNELS:
    for cls, k in counts.items():
      assert sum(n.startswith(f"{ch}_{cls}_") for n in names) == k
  for n in ("shape_VoxelVolume", "shape_Sphericity", "t1c_firstorder_Mean", "t1c_glcm_Idmn",
            "t2fs_glszm_ZoneEntropy", "t2fs_ngtdm_Busyness"):
    assert n in names
  with pytest.raises(UserError, match="unique"):
    rad.feature_names(("t1c", "t1c"))


def test_empty_or_one_voxel_mask_and_absent_image_raise_naming_the_patient():
  image, mask = _volume()
  with pytest.raises(UserError, match="P007.*0 voxel"):
    rad.extract_patient(image, np.zeros_like(mask), 1.0, CHANNELS, patient_id="P007")
  one = np.zeros_like(mask)
  one[8, 8, 8] = 1
  with pytest.raises(UserError, match="P008.*1 voxel"):
    rad.extract_patient(image, one, 1.0, CHANNELS, patient_id="P008")
  with pytest.raises(UserError, match="P009.*absent"):
    rad.extract_patient(None, mask, 1.0, CHANNELS, patient_id="P009")
  with pytest.raises(UserError, match="P010.*2 channels"):
    rad.extract_patient(image[..., :1], mask, 1.0, CHANNELS, patient_id="P010")


def _cohort(tmp_path, *, empty_mask_for=None):
  """A 3-patient prepared cohort: two present images (anisotropic grid), one absent."""
  ids = np.array(["A1", "B2", "C3"])
  vols = [_volume(seed) for seed in (0, 1)]
  images = np.zeros((3, 16, 16, 16, 2), np.float32)
  masks = np.zeros((3, 16, 16, 16), np.uint8)
  for i, (img, m) in enumerate(vols):
    images[i], masks[i] = img, m
  if empty_mask_for is not None:
    masks[empty_mask_for] = 0
  present = np.array([True, True, False])
  # ITK (i, j, k) = (W, H, D) order, as stored by jaxsurv.data.tfds_build.
  geom = {"size": [16, 16, 16], "origin": [0.0, 0.0, 0.0], "spacing": [2.0, 1.0, 1.5],
          "direction": [1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0]}
  case_info = [{"grid_geometry": geom}, {"grid_geometry": geom}, None]
  return PreparedCohort(name="toy", patient_ids=ids, table=pd.DataFrame({"patient_id": ids}),
                        images=images, masks=masks, image_present=present, spec=None,
                        preprocess=None, fingerprint="fp0123456789abcd", data_dir=tmp_path,
                        dataset_dir=tmp_path, case_info=case_info)


def test_cohort_features_cache_round_trip_and_misses(tmp_path, monkeypatch):
  import dataclasses
  prepared = _cohort(tmp_path)
  cache = tmp_path / "cache"
  df = rad.cohort_features(prepared, CHANNELS, cache_dir=cache, workers=2)
  assert df.shape == (3, 200) and list(df.columns) == rad.feature_names(CHANNELS)
  assert df.index.name == "patient_id" and list(df.index) == ["A1", "B2", "C3"]
  assert all(isinstance(p, str) for p in df.index)
  assert (df.dtypes == np.float64).all()
  assert not df.attrs["from_cache"]
  # Present patients: the same as one-patient extraction with (D, H, W) = (1.5, 1, 2) mm.
  for i in (0, 1):
    want = rad.extract_patient(prepared.images[i], prepared.masks[i], (1.5, 1.0, 2.0), CHANNELS)
    np.testing.assert_allclose(df.iloc[i].to_numpy(), [want[c] for c in df.columns], rtol=1e-12)
  assert df.loc["A1", "shape_VoxelVolume"] == pytest.approx(prepared.masks[0].sum() * 3.0)
  # Absent image: a NaN row and its reason.
  assert df.loc["C3"].isna().all()
  assert df.attrs["skipped"] == {"C3": "image absent"}
  csv = pathlib.Path(df.attrs["cache_path"])
  meta = json.loads(csv.with_suffix(".json").read_text())
  assert meta["settings"] == rad.SETTINGS and meta["fingerprint"] == "fp0123456789abcd"
  assert meta["patient_ids"] == ["A1", "B2", "C3"] and meta["channels"] == list(CHANNELS)
  assert meta["pyradiomics_version"] == rad.pyradiomics_version()
  assert meta["skipped"] == {"C3": "image absent"}
  assert sorted(p.suffix for p in cache.iterdir()) == [".csv", ".json"]
  # Two spawn processes give the same table as two threads.
  procs = rad.cohort_features(prepared, CHANNELS, cache_dir=tmp_path / "cache_p", workers=2,
                              executor="process")
  pd.testing.assert_frame_equal(procs, df, check_exact=True)

  def boom(*args, **kwargs):
    raise RuntimeError("extractor called")
  monkeypatch.setattr(rad, "extract_patient", boom)
  again = rad.cohort_features(prepared, CHANNELS, cache_dir=cache)
  assert again.attrs["from_cache"] and again.attrs["skipped"] == {"C3": "image absent"}
  pd.testing.assert_frame_equal(again, df, check_exact=True)
  # A changed fingerprint, settings or channel names is another cache entry.
  with pytest.raises(RuntimeError, match="extractor called"):
    rad.cohort_features(dataclasses.replace(prepared, fingerprint="fp_other"), CHANNELS,
                        cache_dir=cache, workers=1)
  with pytest.raises(RuntimeError, match="extractor called"):
    rad.cohort_features(prepared, CHANNELS, cache_dir=cache, workers=1,
                        settings={**rad.SETTINGS, "binWidth": 0.5})
  with pytest.raises(RuntimeError, match="extractor called"):
    rad.cohort_features(prepared, ("t1", "t2"), cache_dir=cache, workers=1)


def test_cohort_empty_mask_on_present_image_raises_naming_the_patient(tmp_path):
  prepared = _cohort(tmp_path, empty_mask_for=1)
  with pytest.raises(UserError, match="1 patient.*'B2'.*0 voxel"):
    rad.cohort_features(prepared, CHANNELS, cache_dir=tmp_path / "cache", workers=1)
  assert not list((tmp_path / "cache").iterdir())  # Nothing cached.


def test_cohort_skip_policy_gives_a_nan_row_with_the_reason(tmp_path):
  prepared = _cohort(tmp_path, empty_mask_for=1)
  df = rad.cohort_features(prepared, CHANNELS, cache_dir=tmp_path / "cache", workers=1,
                           unfeaturisable="skip")
  assert df.loc["B2"].isna().all() and df.loc["C3"].isna().all()
  assert np.isfinite(df.loc["A1"].to_numpy()).all()
  assert "0 voxel" in df.attrs["skipped"]["B2"] and df.attrs["skipped"]["C3"] == "image absent"
  again = rad.cohort_features(prepared, CHANNELS, cache_dir=tmp_path / "cache", workers=1,
                              unfeaturisable="skip")
  assert again.attrs["from_cache"] and again.attrs["skipped"] == df.attrs["skipped"]
  with pytest.raises(UserError, match="'B2'"):  # The default policy is not served from it.
    rad.cohort_features(prepared, CHANNELS, cache_dir=tmp_path / "cache", workers=1)
