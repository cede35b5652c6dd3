"""Tests for jaxsurv.data.prepare and the ``python -m jaxsurv.data`` command line.

A tiny sarcoma_phantom (6 patients, 16^3 grid, 3 mm intermediate spacing) is
prepared once per module into tmp folders (``JAXSURV_CACHE`` points into
tmp). Read-back volumes are compared with a direct ``mri.preprocess_case`` of
the same files, tables with ``read_manifest`` / ``public.load_cohort_table``
(exact ``assert_frame_equal``).
"""

import os
import pathlib
import subprocess
import sys

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import scipy.stats
import tensorflow_datasets as tfds

from conftest import subprocess_pythonpath
from jaxsurv.data import manifest as mf
from jaxsurv.data import mri
from jaxsurv.data import phantom
from jaxsurv.data import prepare
from jaxsurv.data import public
from jaxsurv.data import splits as splits_lib
from jaxsurv.data import __main__ as cli
from jaxsurv.errors import UserError

REPO = pathlib.Path(__file__).resolve().parents[1]
CFG = mri.PreprocessConfig(grid=(16, 16, 16), spacing_mm=3.0)
N = 6


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  """JAXSURV_CACHE in tmp and the base prepared cohort (6 patients, 16^3)."""
  root = tmp_path_factory.mktemp("prep")
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv("JAXSURV_CACHE", str(root / "cache"))
    data_dir = root / "tfds"
    pc = prepare.prepare_cohort("sarcoma_phantom", n_patients=N, seed=0, preprocess=CFG,
                                data_dir=data_dir, progress=False)
    manifest = root / "cache" / "cohorts" / "sarcoma_phantom" / f"seed0-n{N}" / "manifest.csv"
    yield dict(root=root, data_dir=data_dir, prepared=pc, manifest=manifest)


def _copy_manifest(src: pathlib.Path, dst_dir: pathlib.Path, edit=None) -> pathlib.Path:
  """Writes a copy of a demo manifest with absolute image paths; ``edit(df)`` changes it."""
  df = pd.read_csv(src, dtype=str, keep_default_na=False)
  for c in ("t1c", "t2fs", "mask"):
    df[c] = [str(src.parent / p) if p else "" for p in df[c]]
  if edit is not None:
    edit(df)
  dst_dir.mkdir(parents=True, exist_ok=True)
  out = dst_dir / "manifest.csv"
  df.to_csv(out, index=False)
  return out


def test_read_back_equals_direct_preprocessing(env):
  pc = env["prepared"]
  spec = prepare.cohort_spec("sarcoma_phantom")
  df = mf.read_manifest(env["manifest"], spec)
  assert pc.reused is False
  assert len(pc) == N and pc.images.shape == (N, 16, 16, 16, 2) and pc.images.dtype == np.float32
  assert pc.masks.shape == (N, 16, 16, 16) and pc.masks.dtype == np.uint8
  assert pc.image_present.tolist() == [True] * N
  np.testing.assert_array_equal(pc.patient_ids, df["patient_id"].to_numpy(str))
  assert pc.fingerprint == CFG.fingerprint() and pc.preprocess == CFG and pc.spec == spec
  for k in (0, N - 1):
    case = mri.preprocess_case([df["t1c"][k], df["t2fs"][k]], df["mask"][k], CFG)
    np.testing.assert_array_equal(pc.images[k], case.volume)
    np.testing.assert_array_equal(pc.masks[k], case.mask)
    grid, original = pc.case_geometry(k)
    assert grid == case.grid_geometry and original == case.original_geometry
  # The table (every non-path column, oracle included) round-trips exactly.
  pd.testing.assert_frame_equal(pc.table, df.drop(columns=["t1c", "t2fs", "mask"]))
  assert {"eta_os", "eta_dm", "site"} <= set(pc.table.columns)
  # Typed outcome features agree with the table (float32 days).
  src = prepare.data_source(pc)
  rec = src[2]
  assert rec["os_time"] == np.float32(df["os_time"][2]) and rec["dm_event"] == df["dm_event"][2]
  assert pc.dataset_dir.parent.name.startswith("sarcoma_phantom-seed0-n6-16x16x16-fp")
  assert CFG.fingerprint() in pc.dataset_dir.parent.name


def test_builder_name_and_version_locate_prepared_datasets(env):
  """Dataset name, config-name scheme and version fix the folder of an already prepared cohort."""
  pc = env["prepared"]
  assert prepare.DATASET_NAME == "jaxsurv_cohort" and prepare.SPLIT == "patients"
  assert tfds.builder_cls(prepare.DATASET_NAME) is prepare.JaxsurvCohort
  assert str(prepare.JaxsurvCohort.VERSION) == "1.0.0"
  assert pc.dataset_dir == (env["data_dir"] / "jaxsurv_cohort" /
                            f"sarcoma_phantom-seed0-n{N}-16x16x16-fp{CFG.fingerprint()}" / "1.0.0")


def test_demo_cohort_spec_is_the_phantom_spec():
  """One definition of a demo cohort's spec (``phantom.cohort_spec``); tabular specs from public."""
  for name in prepare.DEMO_COHORTS:
    assert prepare.cohort_spec(name) == phantom.cohort_spec(name)
  assert prepare.cohort_spec("gbsg").channels == () and prepare.cohort_spec("gbsg").outcomes == ("dm",)
  with pytest.raises(ValueError, match="unknown cohort 'nope'.*known"):
    prepare.cohort_spec("nope")


def test_second_prepare_reuses_files(env, monkeypatch):
  pc = env["prepared"]
  before = {p.name: p.stat().st_mtime_ns for p in pc.dataset_dir.iterdir()}

  def boom(*a, **k):
    raise AssertionError("preprocess_case must not run for a prepared version")
  monkeypatch.setattr(mri, "preprocess_case", boom)
  again = prepare.prepare_cohort("sarcoma_phantom", n_patients=N, seed=0, preprocess=CFG,
                                 data_dir=env["data_dir"], progress=False)
  assert again.reused is True and again.dataset_dir == pc.dataset_dir
  assert {p.name: p.stat().st_mtime_ns for p in pc.dataset_dir.iterdir()} == before
  np.testing.assert_array_equal(again.images, pc.images)


def test_changed_setting_prepares_a_new_version_side_by_side(env):
  cfg12 = mri.PreprocessConfig(grid=(12, 12, 12), spacing_mm=3.0)
  pc12 = prepare.prepare_cohort("sarcoma_phantom", n_patients=N, seed=0, preprocess=cfg12,
                                data_dir=env["data_dir"], progress=False)
  assert pc12.reused is False and pc12.images.shape == (N, 12, 12, 12, 2)
  assert pc12.dataset_dir != env["prepared"].dataset_dir
  listed = {r["dataset_dir"] for r in prepare.list_prepared(env["data_dir"])}
  assert {pc12.dataset_dir, env["prepared"].dataset_dir} <= listed
  # The first version is untouched and still reads back.
  first = prepare.load_prepared(env["prepared"].dataset_dir)
  np.testing.assert_array_equal(first.images, env["prepared"].images)


def test_absent_images_are_kept(env, tmp_path):
  spec = prepare.cohort_spec("sarcoma_phantom")

  def blank(df):
    df.loc[1, ["t1c", "t2fs", "mask"]] = ""  # Empty cells: image modality missing.
    df.loc[3, "t2fs"] = str(tmp_path / "nowhere_t2fs.nii.gz")  # Path given, no file.
  path = _copy_manifest(env["manifest"], tmp_path / "cohort", blank)
  data_dir = tmp_path / "tfds"
  with pytest.raises(mf.CohortValidationError, match="phantom-0003.*missing_file|missing_file.*phantom-0003"):
    prepare.prepare_cohort(path, spec=spec, preprocess=CFG, data_dir=data_dir, progress=False)
  pc = prepare.prepare_cohort(path, spec=spec, preprocess=CFG, data_dir=data_dir, progress=False,
                              missing_images="absent")
  assert pc.image_present.tolist() == [True, False, True, False, True, True]
  assert len(pc.table) == N and pc.patient_ids[1] == "phantom-0001"
  assert not pc.images[[1, 3]].any() and not pc.masks[[1, 3]].any()
  assert pc.case_geometry(1) is None
  np.testing.assert_array_equal(pc.images[0], env["prepared"].images[0])
  assert pc.dataset_dir.parent.name.startswith("manifest-")


def test_validation_error_stops_before_preprocessing(env, tmp_path, monkeypatch):
  calls = []
  monkeypatch.setattr(mri, "preprocess_case", lambda *a, **k: calls.append(a))

  def negative(df):
    df.loc[4, "os_time"] = "-5"
  path = _copy_manifest(env["manifest"], tmp_path / "cohort", negative)
  data_dir = tmp_path / "tfds"
  with pytest.raises(mf.CohortValidationError) as err:
    prepare.prepare_cohort(path, spec=prepare.cohort_spec("sarcoma_phantom"), preprocess=CFG,
                           data_dir=data_dir, progress=False)
  assert "phantom-0004" in str(err.value) and "negative_time" in str(err.value)
  assert calls == []
  assert prepare.list_prepared(data_dir) == []
  assert not data_dir.exists()  # Not even an empty folder.


def test_preprocessing_failure_names_the_patient(env, tmp_path):
  # A constant T1c passes validation (headers) but cannot be z-scored.
  const = tmp_path / "const_t1c.nii.gz"
  src_img = nib.load(str(env["manifest"].parent / "images" / "phantom-0002_t1c.nii.gz"))
  nib.save(nib.Nifti1Image(np.full(src_img.shape, 100, np.int16), src_img.affine), str(const))

  def swap(df):
    df.loc[2, "t1c"] = str(const)
  path = _copy_manifest(env["manifest"], tmp_path / "cohort", swap)
  data_dir = tmp_path / "tfds"
  with pytest.raises(prepare.PreprocessingError, match="phantom-0002.*zero intensity variance"):
    prepare.prepare_cohort(path, spec=prepare.cohort_spec("sarcoma_phantom"), preprocess=CFG,
                           data_dir=data_dir, progress=False)
  assert prepare.list_prepared(data_dir) == []  # Nothing half-written is left as prepared.
  # Nor any folder: TFDS removes its temporary version folder, prepare the
  # empty folders created on the way (config, builder, downloads, data_dir).
  assert not data_dir.exists(), sorted(map(str, data_dir.rglob("*")))


def test_failure_keeps_existing_folders(env, tmp_path):
  """Only folders created by the failed call are removed, and only if empty."""
  const = tmp_path / "const_t1c.nii.gz"
  src_img = nib.load(str(env["manifest"].parent / "images" / "phantom-0001_t1c.nii.gz"))
  nib.save(nib.Nifti1Image(np.full(src_img.shape, 7, np.int16), src_img.affine), str(const))

  def swap(df):
    df.loc[1, "t1c"] = str(const)
  path = _copy_manifest(env["manifest"], tmp_path / "cohort", swap)
  data_dir = tmp_path / "tfds"
  (data_dir / "downloads").mkdir(parents=True)
  (data_dir / "other.txt").write_text("keep")
  with pytest.raises(prepare.PreprocessingError, match="phantom-0001"):
    prepare.prepare_dataset(path, spec=prepare.cohort_spec("sarcoma_phantom"), preprocess=CFG,
                            data_dir=data_dir, progress=False)
  assert sorted(p.name for p in data_dir.iterdir()) == ["downloads", "other.txt"]


@pytest.mark.parametrize("trailer", ["", "\n\n"])
def test_empty_manifest_is_a_user_error_and_writes_nothing(env, tmp_path, monkeypatch, trailer):
  """A header without rows: UserError naming the file, before any folder is made."""
  path = _copy_manifest(env["manifest"], tmp_path / "cohort",
                        lambda df: df.drop(df.index, inplace=True))
  path.write_text(path.read_text() + trailer)
  assert len(path.read_text().strip().splitlines()) == 1  # Header only.
  cache = tmp_path / "fresh_cache"
  monkeypatch.setenv("JAXSURV_CACHE", str(cache))
  spec = prepare.cohort_spec("sarcoma_phantom")
  for data_dir in (None, tmp_path / "tfds"):
    with pytest.raises(UserError, match=r"manifest.*manifest\.csv: no patient rows") as err:
      prepare.prepare_dataset(path, spec=spec, preprocess=CFG, data_dir=data_dir, progress=False)
    assert isinstance(err.value, ValueError)
    assert str(path) in str(err.value)
  with pytest.raises(UserError, match="no patient rows"):
    prepare.prepare_cohort(path, spec=spec, preprocess=CFG, progress=False)
  assert not cache.exists() and not (tmp_path / "tfds").exists()


def test_tabular_cohort_round_trips(env, tmp_path):
  pc = prepare.prepare_cohort("gbsg", data_dir=tmp_path / "tfds", progress=False)
  ref = public.load_cohort_table("gbsg")
  pd.testing.assert_frame_equal(pc.table, ref)
  assert pc.images is None and pc.masks is None and not pc.image_present.any()
  assert pc.spec.channels == () and pc.spec.outcomes == ("dm",) and pc.preprocess is None
  np.testing.assert_array_equal(pc.patient_ids, ref["patient_id"].to_numpy(str))
  batch = next(iter(prepare.grain_batches(pc, 32, seed=1)))
  assert set(batch) == {"index", "dm_time", "dm_event"}
  np.testing.assert_allclose(batch["dm_time"], ref["dm_time"].to_numpy()[batch["index"]], rtol=1e-6)
  np.testing.assert_array_equal(batch["dm_event"], ref["dm_event"].to_numpy()[batch["index"]])
  assert prepare.prepare_cohort("gbsg", data_dir=tmp_path / "tfds", progress=False).reused
  with pytest.raises(ValueError, match="no images"):
    prepare.prepare_dataset("gbsg", preprocess=CFG, data_dir=tmp_path / "tfds")


def test_rotterdam_rendered_keeps_tumour_size_visible(env, tmp_path):
  # Default settings use a fixed field of view, so the mask's voxel count on
  # the grid grows with the rendered diameter (a box + margin crop would
  # rescale every tumour to about the same size).
  pc = prepare.prepare_cohort("rotterdam_rendered", n_patients=8, data_dir=tmp_path / "tfds",
                              progress=False)
  assert pc.preprocess == prepare.ROTTERDAM_RENDERED_PREPROCESS and pc.images.shape[1:] == (64, 64, 64, 2)
  assert "size" not in pc.table.columns and "grade" not in pc.table.columns
  voxels = pc.masks.reshape(len(pc), -1).sum(axis=1)
  diameter = pc.table["render_diameter_mm"].to_numpy()
  # Rank correlation (not strict order): axis ratios and margins are random.
  rho = scipy.stats.spearmanr(diameter, voxels).statistic
  assert rho > 0.9, (diameter, voxels)
  assert voxels.max() > 10 * voxels.min()


def test_grain_batches_match_memory(env):
  pc = env["prepared"]
  ds = prepare.grain_batches(pc, 4, seed=3, num_epochs=2)
  batches = list(ds)
  assert len(batches) == 3  # 12 records over 2 epochs, batch 4.
  for b in batches:
    assert b["image"].shape == (4, 16, 16, 16, 2) and b["image"].dtype == np.float32
    assert b["mask"].shape == (4, 16, 16, 16) and b["image_present"].dtype == np.bool_
    np.testing.assert_array_equal(b["image"], pc.images[b["index"]])
    np.testing.assert_array_equal(b["os_event"], pc.table["os_event"].to_numpy()[b["index"]])
  order = np.concatenate([b["index"] for b in batches])
  assert sorted(order[:6]) == list(range(6)) and sorted(order[6:]) == list(range(6))
  assert order[:6].tolist() != order[6:].tolist()  # Each epoch has its own permutation.
  sub = list(prepare.grain_batches(pc, 2, seed=0, indices=[5, 1, 4], drop_remainder=False))
  assert sorted(np.concatenate([b["index"] for b in sub]).tolist()) == [1, 4, 5]
  with pytest.raises(ValueError, match="indices"):
    prepare.grain_batches(pc, 2, indices=[0, N])


def test_bad_arguments():
  with pytest.raises(ValueError, match="unknown|neither"):
    prepare.prepare_dataset("no_such_cohort")
  with pytest.raises(ValueError, match="spec"):
    prepare.prepare_dataset("sarcoma_phantom", spec=mf.CohortSpec())
  with pytest.raises(ValueError, match="n_patients"):
    prepare.prepare_dataset("gbsg", n_patients=5)
  with pytest.raises(ValueError, match="missing_images"):
    prepare.prepare_dataset("gbsg", missing_images="drop")
  spec = mf.CohortSpec(numeric=("age",), categorical=("grade",), categorical_levels={"grade": (1, 2)})
  assert prepare.spec_from_json(prepare.spec_to_json(spec)) == spec
  with pytest.raises(ValueError, match="unknown keys"):
    prepare.spec_from_json({"chanels": ["t1c"]})
  assert prepare.default_preprocess("rotterdam_rendered").fov_mm is not None
  assert prepare.default_preprocess("gbsg") is None


def test_cli_prepare_and_list(env, tmp_path, capsys, monkeypatch):
  monkeypatch.setenv("JAXSURV_CACHE", str(env["root"] / "cache"))
  data_dir = tmp_path / "tfds"
  run_env = dict(os.environ, JAXSURV_CACHE=str(env["root"] / "cache"),
                 PYTHONPATH=subprocess_pythonpath())
  cmd = [sys.executable, "-m", "jaxsurv.data", "prepare", "sarcoma_phantom", "--n-patients", "4",
         "--grid", "12", "--spacing-mm", "3", "--data-dir", str(data_dir), "--workers", "2"]
  out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO, env=run_env)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "prepared sarcoma_phantom: 4 patients" in out.stdout
  (row,) = prepare.list_prepared(data_dir)
  assert row["n_patients"] == 4 and f"{row['dataset_dir']}" in out.stdout
  pc = prepare.load_prepared(row["dataset_dir"])
  assert pc.images.shape == (4, 12, 12, 12, 2)
  # Two worker processes give the same volumes as this process would.
  df = mf.read_manifest(env["root"] / "cache" / "cohorts" / "sarcoma_phantom" / "seed0-n4" /
                        "manifest.csv", prepare.cohort_spec("sarcoma_phantom"))
  cfg = mri.PreprocessConfig(grid=(12, 12, 12), spacing_mm=3.0)
  assert pc.preprocess == cfg
  case = mri.preprocess_case([df["t1c"][3], df["t2fs"][3]], df["mask"][3], cfg)
  np.testing.assert_array_equal(pc.images[3], case.volume)
  # The other commands run in-process (same code path as `python -m`, no interpreter start-up).
  assert cli.main(cmd[3:-2]) == 0
  assert "reused sarcoma_phantom: 4 patients" in capsys.readouterr().out
  assert cli.main(["list", "--data-dir", str(data_dir)]) == 0
  listed = capsys.readouterr().out
  assert "rotterdam_rendered" in listed and row["config"] in listed
  # Bad input ends with one message and exit status 2; a flag of another command,
  # or a grid given as three words, is a usage error (status 1).
  assert cli.main(["prepare", "gbsg", "--grid", "8", "--data-dir", str(data_dir)]) == 2
  assert capsys.readouterr().err.strip() == (
      "jaxsurv: error: cohort 'gbsg' has no images; preprocessing flags ['--grid'] do not apply")
  assert cli.main(["list", "--grid", "8"]) == 1
  assert "list does not take --grid" in capsys.readouterr().err
  assert cli.main(["prepare", "sarcoma_phantom", "--grid", "8", "8", "8"]) == 1
  assert "give --grid as D,H,W" in capsys.readouterr().err
  assert cli.main(["prepare", "sarcoma_phantom", "--grid=8,8", "--data-dir", str(data_dir)]) == 2
  assert "--grid takes 1 or 3 integers" in capsys.readouterr().err


def test_cli_manifest_writes_a_label_free_part_of_a_run(env, tmp_path, capsys, monkeypatch):
  monkeypatch.setenv("JAXSURV_CACHE", str(env["root"] / "cache"))
  spec = prepare.cohort_spec("sarcoma_phantom")
  full = mf.read_manifest(prepare.demo_manifest("sarcoma_phantom", 4), spec)
  ids = list(full["patient_id"])
  split_path = splits_lib.save_splits(splits_lib.Split(tuple(ids[:2]), (ids[2],), (ids[3],)),
                                      tmp_path / "splits.json")
  out = tmp_path / "new.csv"
  assert cli.main(["manifest", "sarcoma_phantom", "--n-patients", "4", "--splits",
                   str(split_path), "--part", "val", "--drop-outcomes", "--out", str(out)]) == 0
  assert "1 patients" in capsys.readouterr().out
  new = pd.read_csv(out, dtype=str)
  assert new["patient_id"].tolist() == [ids[2]]
  assert not set(spec.outcome_columns) & set(new.columns)
  assert not [c for c in new.columns if phantom.is_non_model_column(c)]
  assert set(spec.clinical) <= set(new.columns)
  for c in spec.path_columns:  # absolute paths, so the file works from any folder
    assert pathlib.Path(new[c][0]).is_absolute() and pathlib.Path(new[c][0]).is_file()
  # Without --drop-outcomes the outcomes stay; a splits file from another cohort is named.
  assert cli.main(["manifest", "sarcoma_phantom", "--n-patients", "4", "--out", str(out)]) == 0
  assert set(spec.outcome_columns) <= set(pd.read_csv(out).columns)
  bad = splits_lib.save_splits(splits_lib.Split(("x1",), (), ("x2",)), tmp_path / "bad.json")
  assert cli.main(["manifest", "sarcoma_phantom", "--n-patients", "4", "--splits", str(bad),
                   "--out", str(tmp_path / "b.csv")]) == 2
  assert "not in sarcoma_phantom" in capsys.readouterr().err
  assert not (tmp_path / "b.csv").exists()
