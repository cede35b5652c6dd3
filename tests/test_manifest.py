"""Tests for jaxsurv.data.manifest: reading, validation (every problem at once), presence.

Tiny synthetic NIfTI cohorts (20x20x10 voxels) are written with nibabel into
tmp_path; each bad-input kind gets its own patient, so one validation run must
report all of them with patient, column and file.
"""

import os
import pathlib
import pickle

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from jaxsurv.data import manifest as mf

SHAPE = (20, 20, 10)
ZOOMS = (1.0, 1.0, 2.0)


def _affine(zooms=ZOOMS, shift=(0.0, 0.0, 0.0)):
  aff = np.diag(list(zooms) + [1.0])
  aff[:3, 3] = np.asarray([-10.0, -10.0, -10.0]) + np.asarray(shift)
  return aff


def _write(path, data, affine):
  nib.save(nib.Nifti1Image(np.asarray(data), affine), str(path))
  return path


def _case(folder: pathlib.Path, pid: str, *, t2_shape=SHAPE, t2_shift=(0, 0, 0), mask_shape=SHAPE,
          empty_mask=False, t2_zooms=ZOOMS):
  """Writes t1c/t2fs/mask NIfTI files for one patient; returns paths relative to ``folder``."""
  rng = np.random.default_rng(int.from_bytes(pid.encode(), "little") % 2**32)
  d = folder / "images" / pid
  d.mkdir(parents=True, exist_ok=True)
  _write(d / "t1c.nii.gz", rng.normal(100, 10, SHAPE).astype(np.float32), _affine())
  _write(d / "t2fs.nii.gz", rng.normal(50, 5, t2_shape).astype(np.float32), _affine(t2_zooms, t2_shift))
  m = np.zeros(mask_shape, np.uint8)
  if not empty_mask:
    m[8:12, 8:12, 4:6] = 1
  _write(d / "mask.nii.gz", m, _affine())
  return {c: f"images/{pid}/{c}.nii.gz" for c in ("t1c", "t2fs", "mask")}


def _row(pid, paths, **kw):
  row = dict(patient_id=pid, **paths, age=60.0, grade="G2", os_time=400.0, os_event=1,
             dm_time=300.0, dm_event=0, site="A", split="train")
  row.update(kw)
  return row


SPEC = mf.CohortSpec(channels=("t1c", "t2fs"), mask="mask", numeric=("age",),
                     categorical=("grade",), outcomes=("os", "dm"),
                     categorical_levels={"grade": ("G1", "G2", "G3")}, geometry_tol_mm=0.5)


def _manifest(folder, rows):
  path = mf.write_manifest(rows, folder / "cohort.csv")
  assert path == folder / "cohort.csv" and path.is_file()
  return path


def test_good_cohort_reads_resolves_and_validates(tmp_path):
  rows = [_row(f"P{i:03d}", _case(tmp_path, f"P{i:03d}")) for i in range(3)]
  # Missing image and a missing clinical value are allowed (modality presence).
  rows.append(_row("P100", {"t1c": "", "t2fs": "", "mask": ""}, age=np.nan, grade=""))
  path = _manifest(tmp_path, rows)

  df = mf.read_manifest(path, SPEC)
  assert list(df["patient_id"]) == ["P000", "P001", "P002", "P100"]
  # Relative paths resolve against the manifest's folder, absolute.
  assert df["t1c"][0] == str(tmp_path / "images" / "P000" / "t1c.nii.gz")
  assert os.path.isabs(df["mask"][2]) and os.path.isfile(df["mask"][2])
  assert df["t1c"][3] is None

  # Validation from the path and from the DataFrame agree; working dir does not matter.
  cwd = os.getcwd()
  os.chdir("/")
  try:
    report = mf.validate_cohort(path, SPEC)
  finally:
    os.chdir(cwd)
  assert report.ok, str(report)
  assert report.n_patients == 4 and report.image_check == "header"
  report.raise_if_errors()  # Does not raise.
  assert mf.validate_cohort(df, SPEC, check_images="full").ok

  pres = mf.modality_presence(df, SPEC)
  np.testing.assert_array_equal(pres["image"], [True, True, True, False])
  np.testing.assert_array_equal(pres["age"], [True, True, True, False])
  np.testing.assert_array_equal(pres["grade"], [True, True, True, False])
  assert set(pres) == {"image", "age", "grade"}


def test_every_problem_is_reported_at_once(tmp_path):
  t = tmp_path
  rows = [_row("P01", _case(t, "P01"))]

  p = _case(t, "P02")
  p["t2fs"] = "images/P02/does_not_exist.nii.gz"
  rows.append(_row("P02", p))

  p = _case(t, "P03")  # Truncated .nii.gz: ITK would read it silently zero-filled.
  f = t / p["t1c"]
  data = f.read_bytes()
  f.write_bytes(data[: len(data) // 2])
  rows.append(_row("P03", p))

  p = _case(t, "P04")  # Not an image at all.
  (t / p["t2fs"]).write_bytes(os.urandom(300))
  rows.append(_row("P04", p))

  rows.append(_row("P05", _case(t, "P05", t2_shape=(20, 20, 12))))
  rows.append(_row("P06", _case(t, "P06", t2_shift=(3.0, 0.0, 0.0))))
  rows.append(_row("P07", _case(t, "P07", t2_shift=(0.1, 0.0, 0.0))))  # Within 0.5 mm: fine.
  rows.append(_row("P08", _case(t, "P08", empty_mask=True)))
  rows.append(_row("P09", _case(t, "P09"), os_time=np.nan))
  rows.append(_row("P10", _case(t, "P10"), dm_time=-5.0))
  rows.append(_row("P11", _case(t, "P11"), os_event=2))
  rows.append(_row("P12", _case(t, "P12")))
  rows.append(_row("P12", _case(t, "P12")))
  rows.append(_row("P13", _case(t, "P13"), grade="G9"))
  rows.append(_row("P14", _case(t, "P14"), age="sixty"))
  rows.append(_row("P15", _case(t, "P15", mask_shape=(20, 20, 9))))
  rows.append(_row("P16", _case(t, "P16", t2_zooms=(1.0, 1.0, 2.2))))  # Spacing: corners 1.8 mm off.
  path = _manifest(t, rows)

  report = mf.validate_cohort(path, SPEC)
  got = {(p.patient_id, p.kind, p.column) for p in report.problems}
  expected = {
      ("P02", "missing_file", "t2fs"),
      ("P03", "corrupt_file", "t1c"),
      ("P04", "unreadable_file", "t2fs"),
      ("P05", "shape_mismatch", "t2fs"),
      ("P06", "affine_mismatch", "t2fs"),
      ("P08", "empty_mask", "mask"),
      ("P09", "missing_time", "os_time"),
      ("P10", "negative_time", "dm_time"),
      ("P11", "bad_event", "os_event"),
      ("P12", "duplicate_id", "patient_id"),
      ("P13", "unknown_level", "grade"),
      ("P14", "non_numeric", "age"),
      ("P15", "shape_mismatch", "mask"),
      ("P16", "affine_mismatch", "t2fs"),
  }
  assert got == expected, str(report)
  assert len(report.problems) == len(expected)
  by = {(p.patient_id, p.kind): p for p in report.problems}
  # Files are named, absolute.
  assert by["P02", "missing_file"].file == str(t / "images/P02/does_not_exist.nii.gz")
  assert by["P03", "corrupt_file"].file == str(t / "images/P03/t1c.nii.gz")
  assert "truncated" in by["P03", "corrupt_file"].message or "ended" in by["P03", "corrupt_file"].message
  assert "(20, 20, 12)" in by["P05", "shape_mismatch"].message
  assert "3 mm" in by["P06", "affine_mismatch"].message
  assert "1.8 mm" in by["P16", "affine_mismatch"].message
  assert "'G9'" in by["P13", "unknown_level"].message
  assert "rows [11, 12]" in by["P12", "duplicate_id"].message

  with pytest.raises(mf.CohortValidationError) as exc:
    report.raise_if_errors()
  msg = str(exc.value)
  assert f"{len(expected)} problem(s)" in msg
  for pid, kind, col in expected:
    assert pid in msg and kind in msg and col in msg
  for p in report.problems:
    if p.file:
      assert p.file in msg
  assert exc.value.problems == report.problems
  assert str(pickle.loads(pickle.dumps(exc.value))) == msg
  assert "P07" not in msg and "P01" not in msg


def test_missing_columns_and_outcomes_at_inference(tmp_path):
  rows = [_row("P1", _case(tmp_path, "P1")), _row("P2", _case(tmp_path, "P2"), grade="G4")]
  df = pd.DataFrame(rows).drop(columns=["os_time", "dm_event", "age"])
  path = _manifest(tmp_path, df.to_dict("records"))
  report = mf.validate_cohort(path, SPEC)
  assert {(p.kind, p.column) for p in report.problems} == {
      ("missing_column", "os_time"), ("missing_column", "dm_event"), ("missing_column", "age"),
      ("unknown_level", "grade")}
  # At inference outcomes are not needed; unknown levels and missing clinical columns still are errors.
  report = mf.validate_cohort(path, SPEC, require_outcomes=False)
  assert {(p.kind, p.column) for p in report.problems} == {
      ("missing_column", "age"), ("unknown_level", "grade")}
  # Without known levels the level is not checked.
  spec = mf.CohortSpec(channels=("t1c", "t2fs"), categorical=("grade",), outcomes=())
  assert mf.validate_cohort(path, spec).ok


def test_time_and_event_parsing_edge_cases(tmp_path):
  rows = [_row("A", {}, os_time="12 days"), _row("B", {}, os_event=np.nan), _row("C", {}, os_event=0.5),
          _row("D", {}, os_time=np.inf), _row("E", {}, os_time=0.0, os_event=1.0), _row("", {})]
  spec = mf.CohortSpec(channels=(), mask=None, outcomes=("os",))
  report = mf.validate_cohort(_manifest(tmp_path, rows), spec)
  assert [(p.patient_id, p.kind) for p in report.problems] == [
      (None, "missing_id"), ("A", "bad_time"), ("B", "missing_event"), ("C", "bad_event"),
      ("D", "bad_time")]


def test_partial_images_missing_mask_and_check_levels(tmp_path):
  p1 = _case(tmp_path, "P1")
  p2 = dict(_case(tmp_path, "P2"), t2fs="")  # Partial: image absent, a warning.
  p3 = dict(_case(tmp_path, "P3"), mask="")  # Images without a mask: error.
  path = _manifest(tmp_path, [_row("P1", p1), _row("P2", p2), _row("P3", p3)])
  report = mf.validate_cohort(path, SPEC)
  assert [(p.patient_id, p.kind) for p in report.problems] == [("P3", "missing_mask")]
  assert [(w.patient_id, w.kind) for w in report.warnings] == [("P2", "partial_image")]
  df = mf.read_manifest(path, SPEC)
  np.testing.assert_array_equal(mf.modality_presence(df, SPEC)["image"], [True, False, False])

  # check_images=False only checks existence, "full" also decompresses.
  (tmp_path / p1["t1c"]).write_bytes(b"garbage")
  assert mf.validate_cohort(path, SPEC, check_images=False).kinds() == ["missing_mask"]
  assert mf.validate_cohort(path, SPEC).kinds() == ["unreadable_file", "missing_mask"]
  os.remove(tmp_path / p1["t1c"])
  assert mf.validate_cohort(path, SPEC, check_images=False).kinds() == ["missing_file", "missing_mask"]
  with pytest.raises(ValueError, match="check_images"):
    mf.validate_cohort(path, SPEC, check_images="deep")


def test_mid_file_corruption_needs_full_check(tmp_path):
  """The cost trade-off: the O(1) screen catches truncation, only "full" catches a flipped middle."""
  rng = np.random.default_rng(0)
  d = tmp_path / "images" / "P1"
  d.mkdir(parents=True)
  _write(d / "t1c.nii.gz", rng.normal(100, 10, (64, 64, 32)).astype(np.float32), _affine())
  _write(d / "t2fs.nii.gz", rng.normal(100, 10, (64, 64, 32)).astype(np.float32), _affine())
  m = np.zeros((64, 64, 32), np.uint8)
  m[30:34, 30:34, 10:12] = 1
  _write(d / "mask.nii.gz", m, _affine())
  f = d / "t2fs.nii.gz"
  data = bytearray(f.read_bytes())
  for i in range(len(data) * 3 // 4, len(data) * 3 // 4 + 40):
    data[i] ^= 0xFF
  f.write_bytes(bytes(data))
  rows = [_row("P1", {c: f"images/P1/{c}.nii.gz" for c in ("t1c", "t2fs", "mask")})]
  path = _manifest(tmp_path, rows)
  assert mf.validate_cohort(path, SPEC).ok
  full = mf.validate_cohort(path, SPEC, check_images="full")
  assert [(p.kind, p.column) for p in full.problems] == [("corrupt_file", "t2fs")]
  assert "CRC" in full.problems[0].message or "Error" in full.problems[0].message


def test_channels_on_other_grids_must_cover_the_tumour(tmp_path):
  spec = mf.CohortSpec(channels=("t1c", "t2fs"), outcomes=(), require_same_grid=False)
  ok = _case(tmp_path, "P1", t2_shape=(10, 10, 5), t2_zooms=(2.0, 2.0, 4.0))  # Same FOV, coarser.
  far = _case(tmp_path, "P2", t2_shift=(15.0, 0.0, 0.0))  # Moved 15 mm: tumour at x=-2..2 mm not covered.
  path = _manifest(tmp_path, [_row("P1", ok), _row("P2", far)])
  report = mf.validate_cohort(path, spec)
  assert [(p.patient_id, p.kind, p.column) for p in report.problems] == [("P2", "not_covering", "t2fs")]
  assert "32 tumour voxels" in report.problems[0].message
  # With the default (same grid required) both are errors of another kind.
  strict = mf.validate_cohort(path, mf.CohortSpec(channels=("t1c", "t2fs"), outcomes=()))
  assert strict.kinds() == ["shape_mismatch", "affine_mismatch"]


def test_spec_checks():
  with pytest.raises(ValueError, match="not declared categorical"):
    mf.CohortSpec(categorical=("a",), categorical_levels={"b": ("x",)})
  with pytest.raises(ValueError, match="declared twice"):
    mf.CohortSpec(numeric=("t1c",))
  spec = mf.CohortSpec(channels="t1", categorical=("g",), categorical_levels={"g": [1, 2.0, "x"]})
  assert spec.channels == ("t1",) and spec.categorical_levels == {"g": ("1", "2", "x")}
  assert spec.outcome_columns == ("os_time", "os_event", "dm_time", "dm_event")
  with pytest.raises(FileNotFoundError):
    mf.read_manifest("/nonexistent/cohort.csv", spec)
