"""Tests for jaxsurv.data.mri: geometry of the tumour-centred crop, z-score, mapping back,
orientation, channel resampling, N4, errors, fingerprints and the real pyradiomics scans.

Synthetic scans sample an analytic scene (a sphere off-centre, intensity graded
along the patient's right-left axis) on anisotropic grids written with nibabel,
so the expected output follows from physics, not from the code under test.
"""

import pathlib
import pickle
import subprocess
import sys

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from jaxsurv.data import manifest as mf
from jaxsurv.data import mri

CENTRE_RAS = np.array([15.0, -12.0, 9.0])  # mm; off the volume's centre (0, 0, 0).
RADIUS = 12.0  # mm


def _scene(ras):
  """Intensity and mask at RAS points ``[..., 3]``: a graded sphere on a flat background."""
  d = np.linalg.norm(ras - CENTRE_RAS, axis=-1)
  inside = d <= RADIUS
  # Intensity grows towards patient Right (RAS +x).
  img = np.where(inside, 100.0 + 2.0 * (ras[..., 0] - CENTRE_RAS[0]), 20.0)
  return img.astype(np.float32), inside.astype(np.uint8)


def _write_scene(folder, name, affine, shape, *, t2_scale=None):
  """Samples the scene on a grid (voxel (i,j,k) -> RAS by ``affine``), writes image + mask."""
  folder.mkdir(parents=True, exist_ok=True)
  ijk = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), axis=-1)
  ras = ijk @ affine[:3, :3].T + affine[:3, 3]
  img, mask = _scene(ras)
  if t2_scale is not None:
    img = (img * t2_scale).astype(np.float32)
  ip, mp = folder / f"{name}_image.nii.gz", folder / f"{name}_mask.nii.gz"
  nib.save(nib.Nifti1Image(img, affine), str(ip))
  nib.save(nib.Nifti1Image(mask, affine), str(mp))
  return ip, mp


def _aniso_affine(zooms=(0.8, 0.8, 4.0), shape=(100, 100, 20)):
  """RAS affine of a volume centred on (0, 0, 0) with anisotropic voxels."""
  aff = np.diag(list(zooms) + [1.0])
  aff[:3, 3] = -(np.asarray(shape) - 1) / 2 * np.asarray(zooms)
  return aff


SHAPE = (100, 100, 20)  # 80 x 80 x 80 mm at 0.8 x 0.8 x 4 mm.
CFG = mri.PreprocessConfig(spacing_mm=1.0, grid=(32, 32, 32), margin_mm=8.0)


@pytest.fixture(scope="module")
def sphere_case(tmp_path_factory):
  folder = tmp_path_factory.mktemp("sphere")
  ip, mp = _write_scene(folder, "t1", _aniso_affine(), SHAPE)
  return ip, mp, mri.preprocess_case([ip], mp, CFG)


def _grid_ras(case):
  """RAS position (mm) of every output voxel, ``[D, H, W, 3]``."""
  d, h, w = case.mask.shape
  kji = np.stack(np.meshgrid(np.arange(d), np.arange(h), np.arange(w), indexing="ij"), -1)
  return case.grid_geometry.index_to_physical(kji[..., ::-1]) * [-1, -1, 1]


def _deep(ras, reach):
  """Voxels whose interpolation stencil (``reach`` mm per RAS axis) lies inside the sphere."""
  return np.linalg.norm(np.abs(ras - CENTRE_RAS) + np.asarray(reach), axis=-1) < RADIUS


def _raw(case, c):
  """Undoes the z-score of channel ``c``: intensities in the scan's units, ``[D, H, W]``."""
  return case.volume[..., c] * case.channel_std[c] + case.channel_mean[c]


def _extent_through_centre(mask, axis):
  """Number of mask voxels on the line through the mask's bbox centre along ``axis``."""
  nz = np.argwhere(mask)
  c = np.round((nz.min(0) + nz.max(0)) / 2).astype(int)
  idx = list(c)
  idx[axis] = slice(None)
  return int(mask[tuple(idx)].sum())


def test_sphere_is_centred_and_keeps_its_physical_size(sphere_case):
  ip, mp, case = sphere_case
  assert case.volume.shape == (32, 32, 32, 1) and case.volume.dtype == np.float32
  assert case.mask.shape == (32, 32, 32)
  # The mask's bounding box, +8 mm each side, made cubic: voxelised sphere spans
  # 24 mm in every axis here (z: 6 slices of 4 mm; x, y: 30 voxels of 0.8 mm).
  box = 24.0 + 2 * 8.0
  g = box / 32
  np.testing.assert_allclose(case.grid_spacing, [g, g, g], rtol=0.03)
  # Centred although the sphere sits off-centre in the scan.
  nz = np.argwhere(case.mask)
  np.testing.assert_allclose((nz.min(0) + nz.max(0)) / 2, [15.5] * 3, atol=1.0)
  # Diameter in voxels = 2 r / grid spacing along every axis (a spacing bug in z
  # would give 6 or 5x too many voxels).
  expected = 2 * RADIUS / case.grid_spacing[0]
  for axis in range(3):
    assert abs(_extent_through_centre(case.mask, axis) - expected) <= 1.5, axis
  # Volume in mm^3 honours the spacing (4/3 pi r^3 = 7238 mm^3; 4 mm slices blur it).
  vol = case.mask.sum() * np.prod(case.grid_spacing)
  assert abs(vol / (4 / 3 * np.pi * RADIUS**3) - 1) < 0.15
  # The grid's centre voxel sits at the sphere centre (LPS = RAS with x, y negated).
  centre_lps = CENTRE_RAS * [-1, -1, 1]
  mid = case.grid_geometry.index_to_physical([15.5, 15.5, 15.5])
  np.testing.assert_allclose(mid, centre_lps, atol=1.0)


def test_zscore_inside_mask_and_image_mask_alignment(sphere_case):
  _, _, case = sphere_case
  v = case.volume[..., 0]
  inside = case.mask > 0
  assert abs(v[inside].mean()) < 1e-5 and abs(v[inside].std() - 1) < 1e-5
  # Well inside the sphere the output equals the scene at each voxel's physical
  # position (linear interpolation reproduces the linear grading exactly).
  ras = _grid_ras(case)
  # Stencil: 1 mm isotropic stage + one source voxel (0.8 x 0.8 x 4 mm).
  deep = _deep(ras, (1.8, 1.8, 5.0))
  assert deep.sum() > 300
  np.testing.assert_allclose(_raw(case, 0)[deep], 100.0 + 2.0 * (ras[deep][:, 0] - CENTRE_RAS[0]),
                             atol=0.1)
  # Background 20 vs sphere ~100 +- 24: the bright region is the mask.
  bright = _raw(case, 0) > 60.0
  dice = 2 * (bright & inside).sum() / (bright.sum() + inside.sum())
  assert dice > 0.9
  # Canonical LPS axes: W (last) runs towards patient Left, where intensity
  # falls by 2 per mm; it does not change along D (superior) or H (posterior).
  dhw = np.argwhere(deep)
  coef = np.linalg.lstsq(np.c_[dhw, np.ones(len(dhw))], _raw(case, 0)[deep], rcond=None)[0]
  np.testing.assert_allclose(coef[:3], [0.0, 0.0, -2.0 * case.grid_spacing[0]], atol=0.01)
  assert np.all(np.isfinite(case.volume))


def test_to_original_space_puts_values_back(sphere_case):
  ip, mp, case = sphere_case
  orig_mask = nib.load(str(mp))
  # The grid mask mapped back overlaps the original mask (4 mm slices limit it).
  back = case.to_original_space(case.mask.astype(np.float32))
  assert back.GetSize() == tuple(orig_mask.shape)
  ref = sitk.ReadImage(str(mp))
  assert back.GetOrigin() == pytest.approx(ref.GetOrigin())
  assert back.GetDirection() == pytest.approx(ref.GetDirection())
  b = sitk.GetArrayFromImage(back) >= 0.5
  m = sitk.GetArrayFromImage(ref) > 0
  assert 2 * (b & m).sum() / (b.sum() + m.sum()) > 0.85

  # A blob at a known grid voxel lands at that voxel's physical position.
  dhw = np.array([10, 20, 12])
  grid = np.stack(np.meshgrid(*[np.arange(32)] * 3, indexing="ij"), -1)
  blob = np.exp(-((grid - dhw) ** 2).sum(-1) / (2 * 1.5**2)).astype(np.float32)
  out = case.to_original_space(blob)
  arr = sitk.GetArrayFromImage(out)  # [k, j, i]
  kji = np.argwhere(arr > 0.05)
  w = arr[arr > 0.05]
  geom = mri.Geometry.of(out)
  centroid = (geom.index_to_physical(kji[:, ::-1]) * w[:, None]).sum(0) / w.sum()
  expected = case.grid_geometry.index_to_physical(dhw[::-1])
  np.testing.assert_allclose(centroid, expected, atol=1.0)
  # The same from stored geometries alone (prepared datasets keep only those).
  again = mri.grid_to_original(blob, case.grid_geometry, case.original_geometry)
  np.testing.assert_array_equal(sitk.GetArrayFromImage(again), arr)
  # Outside the crop box the map is the default value.
  assert arr[0, 0, 0] == 0.0
  with pytest.raises(ValueError, match=r"expected shape \(32, 32, 32\)"):
    case.to_original_space(np.zeros((32, 32, 31)))


def test_storage_orientation_does_not_change_output(tmp_path):
  """The same physical scene stored flipped or with permuted axes preprocesses identically."""
  aff = _aniso_affine()
  a = _write_scene(tmp_path / "a", "t1", aff, SHAPE)
  flip = aff.copy()  # Store the x axis reversed: voxel i -> -x.
  flip[:3, 0] *= -1
  flip[:3, 3] = aff[:3, 3] + aff[:3, 0] * (SHAPE[0] - 1)
  b = _write_scene(tmp_path / "b", "t1", flip, SHAPE)
  perm = aff[:, [2, 0, 1, 3]]  # Voxel axes (k, i, j): slices first.
  c = _write_scene(tmp_path / "c", "t1", perm, (SHAPE[2], SHAPE[0], SHAPE[1]))
  out = [mri.preprocess_case([p[0]], p[1], CFG) for p in (a, b, c)]
  for o in out[1:]:
    np.testing.assert_array_equal(o.mask, out[0].mask)
    np.testing.assert_allclose(o.volume, out[0].volume, atol=1e-4)
    np.testing.assert_allclose(o.grid_origin, out[0].grid_origin, atol=1e-4)
  np.testing.assert_allclose(np.reshape(out[0].grid_direction, (3, 3)), np.eye(3), atol=1e-9)


def test_second_channel_resampled_onto_first(tmp_path):
  """A T2 on its own coarser, shifted grid lands on T1's physical grid."""
  t1, mask = _write_scene(tmp_path, "t1", _aniso_affine(), SHAPE)
  t2_aff = _aniso_affine((1.6, 1.6, 5.0), (50, 50, 16))
  t2_aff[:3, 3] += [0.7, -0.3, 1.1]
  t2, _ = _write_scene(tmp_path, "t2", t2_aff, (50, 50, 16), t2_scale=0.5)
  cfg = mri.PreprocessConfig(grid=(32, 32, 32), margin_mm=8.0, require_same_grid=False)
  case = mri.preprocess_case([t1, t2], mask, cfg)
  assert case.volume.shape == (32, 32, 32, 2)
  # Deep inside the sphere (away from partial volume at 5 mm slices) T2 holds
  # half the scene's intensity at each output voxel's physical position.
  ras = _grid_ras(case)
  deep = _deep(ras, (2.6, 2.6, 6.0))  # T2 voxels: 1.6 x 1.6 x 5 mm.
  assert deep.sum() > 100
  truth = 100.0 + 2.0 * (ras[deep][:, 0] - CENTRE_RAS[0])
  np.testing.assert_allclose(_raw(case, 0)[deep], truth, atol=0.1)
  np.testing.assert_allclose(_raw(case, 1)[deep], 0.5 * truth, atol=0.1)
  r_all = np.corrcoef(case.volume[..., 0].ravel(), case.volume[..., 1].ravel())[0, 1]
  assert r_all > 0.9
  with pytest.raises(mri.GeometryMismatchError, match=str(t2)):
    mri.preprocess_case([t1, t2], mask, mri.PreprocessConfig(grid=(32, 32, 32)))


def test_periphery_masking(sphere_case):
  ip, mp, _ = sphere_case
  cfg = mri.PreprocessConfig(grid=(32, 32, 32), margin_mm=8.0, mask_to_periphery=True, periphery_mm=4.0)
  case = mri.preprocess_case([ip], mp, cfg)
  assert case.region is not None and case.region.shape == (32, 32, 32)
  assert np.all(case.region[case.mask > 0])
  assert np.all(case.volume[~case.region] == 0)
  expected = 2 * (RADIUS + 4.0) / case.grid_spacing[0]
  for axis in range(3):
    assert abs(_extent_through_centre(case.region, axis) - expected) <= 2.0, axis
  # MMNN-style tumour only (periphery 0): the region is the tumour.
  tumour = mri.preprocess_case([ip], mp, mri.PreprocessConfig(
      grid=(32, 32, 32), margin_mm=8.0, mask_to_periphery=True, periphery_mm=0.0))
  assert abs(int(tumour.region.sum()) - int(tumour.mask.sum())) <= 0.05 * tumour.mask.sum()


def test_fov_and_stretch_modes(sphere_case):
  ip, mp, _ = sphere_case
  fixed = mri.preprocess_case([ip], mp, mri.PreprocessConfig(grid=(32, 32, 32), fov_mm=64.0))
  np.testing.assert_allclose(fixed.grid_spacing, [2.0, 2.0, 2.0], atol=1e-9)
  assert abs(_extent_through_centre(fixed.mask, 2) - 2 * RADIUS / 2.0) <= 1.5
  # keep_aspect=False stretches each axis on its own: a 16 mm margin box in x only.
  stretch = mri.preprocess_case([ip], mp, mri.PreprocessConfig(grid=(16, 32, 32), margin_mm=8.0,
                                                               keep_aspect=False))
  assert stretch.volume.shape == (16, 32, 32, 1)
  assert stretch.grid_spacing[2] == pytest.approx(2 * stretch.grid_spacing[0], rel=0.05)


def _biased_phantom():
  shape = (20, 40, 40)
  z, y, x = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
  obj = (x / 0.8) ** 2 + (y / 0.8) ** 2 + (z / 0.9) ** 2 < 1
  inner = (x / 0.6) ** 2 + (y / 0.6) ** 2 + (z / 0.7) ** 2 < 1
  rng = np.random.default_rng(0)
  clean = np.where(obj, 100.0, 5.0) + rng.normal(0, 1, shape)
  bias = np.exp(0.35 * x + 0.25 * y - 0.2 * z)  # Smooth multiplicative field.
  img = sitk.GetImageFromArray(np.abs(clean * bias).astype(np.float32))
  img.SetSpacing((2.0, 2.0, 3.0))
  return img, inner


def test_n4_reduces_bias():
  img, inner = _biased_phantom()
  cv = lambda a: a[inner].std() / a[inner].mean()
  before = cv(sitk.GetArrayFromImage(img))
  cfg = mri.PreprocessConfig(n4=True, n4_shrink=2, n4_iterations=(20, 20))
  out = mri.n4_bias_correct(img, cfg)
  after = cv(sitk.GetArrayFromImage(out))
  assert before > 0.1 and after < before / 3, (before, after)
  assert out.GetSize() == img.GetSize() and out.GetSpacing() == img.GetSpacing()
  neg = sitk.GetImageFromArray(np.full((8, 8, 8), -5.0, np.float32))
  with pytest.raises(ValueError, match="non-negative"):
    mri.n4_bias_correct(neg, cfg, path="ct.nrrd")


def test_n4_inside_preprocess_case(tmp_path):
  img, _ = _biased_phantom()
  mask = sitk.GetImageFromArray(np.zeros((20, 40, 40), np.uint8))
  mask.CopyInformation(img)
  mask[15:25, 15:25, 8:12] = 1
  ip, mp = tmp_path / "img.nrrd", tmp_path / "mask.nrrd"
  sitk.WriteImage(img, str(ip), True)
  sitk.WriteImage(mask, str(mp), True)
  base = dict(grid=(16, 16, 16), margin_mm=10.0)
  plain = mri.preprocess_case([ip], mp, mri.PreprocessConfig(**base))
  n4 = mri.preprocess_case([ip], mp, mri.PreprocessConfig(**base, n4=True, n4_shrink=2,
                                                          n4_iterations=(20, 20)))
  assert n4.volume.shape == (16, 16, 16, 1) and np.all(np.isfinite(n4.volume))
  # Inside the (flat) tumour the bias gradient dominates the spread before N4, not after.
  assert n4.channel_std[0] / n4.channel_mean[0] < plain.channel_std[0] / plain.channel_mean[0] / 2
  assert n4.fingerprint != plain.fingerprint


def test_clear_errors_name_the_file(tmp_path, sphere_case):
  ip, mp, _ = sphere_case
  empty = tmp_path / "empty_mask.nii.gz"
  nib.save(nib.Nifti1Image(np.zeros(SHAPE, np.uint8), _aniso_affine()), str(empty))
  with pytest.raises(mri.EmptyMaskError, match=str(empty)):
    mri.preprocess_case([ip], empty, CFG)
  shifted = tmp_path / "shifted_mask.nii.gz"
  aff = _aniso_affine()
  aff[:3, 3] += [2.0, 0, 0]
  nib.save(nib.Nifti1Image(np.ones(SHAPE, np.uint8), aff), str(shifted))
  with pytest.raises(mri.GeometryMismatchError, match=r"shifted_mask.*displaced by up to 2 mm"):
    mri.preprocess_case([ip], shifted, CFG)
  small = tmp_path / "small_mask.nii.gz"
  nib.save(nib.Nifti1Image(np.ones((100, 100, 19), np.uint8), _aniso_affine()), str(small))
  with pytest.raises(mri.GeometryMismatchError, match=r"small_mask.*\(100, 100, 19\)"):
    mri.preprocess_case([ip], small, CFG)
  trunc = tmp_path / "trunc.nii.gz"
  data = pathlib.Path(ip).read_bytes()
  trunc.write_bytes(data[: len(data) // 2])
  with pytest.raises(mri.ImageFileError, match=str(trunc)) as exc:
    mri.preprocess_case([trunc], mp, CFG)
  copy = pickle.loads(pickle.dumps(exc.value))  # Survives a worker process.
  assert str(copy) == str(exc.value) and copy.path == str(trunc)
  with pytest.raises(mri.ImageFileError, match="file not found"):
    mri.preprocess_case([tmp_path / "nope.nii.gz"], mp, CFG)
  flat = tmp_path / "flat.nii.gz"
  nib.save(nib.Nifti1Image(np.full(SHAPE, 7.0, np.float32), _aniso_affine()), str(flat))
  with pytest.raises(ValueError, match="zero intensity variance"):
    mri.preprocess_case([flat], mp, CFG)
  four_d = tmp_path / "4d.nii.gz"
  nib.save(nib.Nifti1Image(np.zeros((4, 4, 4, 2), np.float32), np.eye(4)), str(four_d))
  with pytest.raises(mri.ImageFileError, match="3-D scalar"):
    mri.preprocess_case([four_d], mp, CFG)


def test_config_checks_and_fingerprint():
  a = mri.PreprocessConfig(grid=[64, 64, 64])
  b = mri.PreprocessConfig(grid=(64, 64, 64))
  assert a == b and a.fingerprint() == b.fingerprint()
  assert mri.PreprocessConfig(grid=64).grid == (64, 64, 64)
  fps = {mri.PreprocessConfig(**kw).fingerprint() for kw in (
      {}, {"grid": (128, 128, 128)}, {"n4": True}, {"margin_mm": 5.0}, {"spacing_mm": 0.5},
      {"mask_to_periphery": True}, {"orientation": "RAS"}, {"zscore": False})}
  assert len(fps) == 8
  # Stable across processes (no Python hash randomisation) and pinned.
  code = "from jaxsurv.data import mri; print(mri.PreprocessConfig().fingerprint())"
  other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONHASHSEED": "123", "PATH": ""},
                         cwd=pathlib.Path(__file__).resolve().parents[1]).stdout.strip()
  assert other == mri.PreprocessConfig().fingerprint() == "7f853693939e6505"
  for bad in ({"grid": (64, 64)}, {"spacing_mm": 0}, {"margin_mm": -1}, {"interpolation": "cubic"},
              {"orientation": "LLS"}, {"fov_mm": (10, 0, 10)}):
    with pytest.raises(ValueError, match="PreprocessConfig"):
      mri.PreprocessConfig(**bad)


def _pyradiomics_or_skip():
  from jaxsurv.data import fetch
  try:
    return mri.pyradiomics_cases(("brain1", "brain2"))
  except fetch.FetchError as e:  # No registry access: nothing to test against.
    pytest.skip(f"pyradiomics 3.0.1 sdist not available: {e}")


def test_real_pyradiomics_brain_cases_through_a_manifest(tmp_path):
  cases = _pyradiomics_or_skip()
  # brain1 and brain2 are two patients; one real scan per patient, used for both
  # channels (the channel list is configurable; no T2 exists for them).
  rows = [dict(patient_id=name, t1c=str(img), t2fs=str(img), mask=str(lab), site="pyradiomics")
          for name, (img, lab) in cases.items()]
  path = tmp_path / "real.csv"
  pd.DataFrame(rows).to_csv(path, index=False)
  spec = mf.CohortSpec(channels=("t1c", "t2fs"), mask="mask", outcomes=())
  report = mf.validate_cohort(path, spec, check_images="full")
  assert report.ok, str(report)
  df = mf.read_manifest(path, spec)
  assert mf.modality_presence(df, spec)["image"].all()

  cfg = mri.PreprocessConfig(grid=(48, 48, 48), margin_mm=10.0)
  # Measured on the pyradiomics 3.0.1 label maps (AIM-Harvard/pyradiomics,
  # data/).
  tumour_cm3 = {"brain1": 16.4, "brain2": 1.8}
  for _, row in df.iterrows():
    case = mri.preprocess_case([row["t1c"], row["t2fs"]], row["mask"], cfg)
    assert case.volume.shape == (48, 48, 48, 2) and case.volume.dtype == np.float32
    assert np.all(np.isfinite(case.volume))
    np.testing.assert_allclose(case.volume[..., 0], case.volume[..., 1], atol=1e-5)
    nz = np.argwhere(case.mask)
    np.testing.assert_allclose((nz.min(0) + nz.max(0)) / 2, [23.5] * 3, atol=1.0)
    inside = case.volume[case.mask > 0]
    np.testing.assert_allclose(inside.mean(0), 0, atol=1e-4)
    np.testing.assert_allclose(inside.std(0), 1, atol=1e-4)
    lab = sitk.ReadImage(row["mask"])
    orig_cm3 = (sitk.GetArrayViewFromImage(lab) > 0).sum() * np.prod(lab.GetSpacing()) / 1000
    assert abs(orig_cm3 - tumour_cm3[row["patient_id"]]) < 0.1
    grid_cm3 = case.mask.sum() * np.prod(case.grid_spacing) / 1000
    assert abs(grid_cm3 / orig_cm3 - 1) < 0.1, (row["patient_id"], grid_cm3, orig_cm3)


def test_tiny_tumour_zscore_uses_the_isotropic_stage(tmp_path):
  """A 7 mm tumour on a 4 mm grid still gets finite, non-degenerate z-scores."""
  shape = (40, 40, 12)
  spacing = (2.0, 2.0, 6.0)
  rng = np.random.default_rng(0)
  img = 100 + 10 * rng.normal(size=shape)
  mask = np.zeros(shape, np.uint8)
  mask[20:22, 20:22, 6] = 1  # 4 voxels of 2 x 2 x 6 mm.
  img[mask > 0] += 50
  aff = np.diag(list(spacing) + [1.0])
  nib.save(nib.Nifti1Image(img.astype(np.float32), aff), tmp_path / "t.nii.gz")
  nib.save(nib.Nifti1Image(mask, aff), tmp_path / "m.nii.gz")
  cfg = mri.PreprocessConfig(spacing_mm=2.0, grid=(24, 24, 24), fov_mm=96.0)
  case = mri.preprocess_case([tmp_path / "t.nii.gz"], tmp_path / "m.nii.gz", cfg)
  assert (case.mask > 0).sum() < 27
  assert np.all(np.isfinite(case.volume)) and case.channel_std[0] > 0


def test_sub_voxel_tumour_keeps_a_mask(tmp_path):
  """A tumour smaller than one grid voxel keeps the voxel it covers most."""
  shape = (40, 40, 12)
  aff = np.diag([2.0, 2.0, 6.0, 1.0])
  rng = np.random.default_rng(1)
  img = 100 + 10 * rng.normal(size=shape)
  mask = np.zeros(shape, np.uint8)
  mask[21, 21, 6] = 1  # One 2 x 2 x 6 mm voxel on an 8 mm grid.
  nib.save(nib.Nifti1Image(img.astype(np.float32), aff), tmp_path / "t.nii.gz")
  nib.save(nib.Nifti1Image(mask, aff), tmp_path / "m.nii.gz")
  cfg = mri.PreprocessConfig(spacing_mm=2.0, grid=(12, 12, 12), fov_mm=96.0)
  case = mri.preprocess_case([tmp_path / "t.nii.gz"], tmp_path / "m.nii.gz", cfg)
  assert 1 <= (case.mask > 0).sum() <= 8
  assert np.all(np.isfinite(case.volume))
