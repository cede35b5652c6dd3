"""Tests for jaxsurv.predict: new patients through a finished MMNN run.

One tiny MMNN run is trained per module (sarcoma_phantom, 32 patients, 16^3
grid, tiny DenseNet, 1 epoch). Its own ``predictions.csv`` (computed by the
trainer from the prepared dataset) is the reference for the risk scores, and
scikit-survival's ``BreslowEstimator`` refitted on its training split is the
reference for the survival curves.

An ``--out`` that is the run folder, lies inside it, or is its parent (with
``--overwrite``) is refused with one message, and the run stays intact.

The real-scan test sends the two pyradiomics brain MRIs (brain1, brain2)
through ``python -m jaxsurv.predict --heatmaps`` with that run. The demo run
has 2 channels (t1c, t2fs) and the brain cases 1 scan each, so the manifest
gives the same brain image as both channels; the clinical columns get
plausible values (age 60, female, grade 2, 4 cm, deep, no chemotherapy, no
metastases, post-operative RT, R0 margin, and for location/histotype a level
the run knows). The risk means nothing (a sarcoma model on brain scans); the
test checks the pipeline: real NRRD files in, heat maps on each scan's own
grid out.
"""

import json
import os
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from conftest import REPO, subprocess_pythonpath, tiny_mmnn_config
from jaxsurv import predict
from jaxsurv.data import mri
from jaxsurv.errors import UserError


def _tiny_config():
  return tiny_mmnn_config(**{"data.prepare_workers": 1, "num_epochs": 1,
                             "eval.bootstrap_resamples": 0})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """``(workdir, demo manifest path)`` of one tiny finished run."""
  from jaxsurv import train
  from jaxsurv.data import fetch
  root = tmp_path_factory.mktemp("predict")
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv("JAXSURV_CACHE", str(root / "cache"))
    train.train_and_evaluate(_tiny_config(), str(root / "run"))
    manifest = fetch.cache_dir("cohorts", "sarcoma_phantom", "seed0-n32") / "manifest.csv"
  assert manifest.is_file()
  return root / "run", manifest


def _known_levels(workdir):
  pre = json.loads((workdir / "preprocess.json").read_text())["clinical"]
  return {c: s["levels"] for c, s in pre["categories"].items()}


def _new_patients(trained, tmp_path, n=None):
  """The demo manifest without outcome columns, restricted to patients whose
  levels the run knows (a level seen only outside the training split is
  unknown to the run), with absolute paths."""
  workdir, manifest = trained
  df = pd.read_csv(manifest, dtype=str)
  keep = np.ones(len(df), bool)
  for c, levels in _known_levels(workdir).items():
    keep &= df[c].isin(levels).to_numpy()
  df = df[keep].drop(columns=["os_time", "os_event", "dm_time", "dm_event"])
  for c in ("t1c", "t2fs", "mask"):
    df[c] = [str(manifest.parent / p) for p in df[c]]
  if n is not None:
    df = df.head(n)
  path = tmp_path / "new.csv"
  df.to_csv(path, index=False)
  return path, df


def _no_leftovers(folder):
  return not [p.name for p in folder.iterdir() if ".partial-" in p.name or ".old-" in p.name]


def test_predictions_match_the_run_and_breslow(trained, tmp_path):
  from sksurv.linear_model.coxph import BreslowEstimator
  workdir, manifest = trained
  path, new = _new_patients(trained, tmp_path)
  assert 25 <= len(new) < 32  # The rare-level patient(s) left out.
  summary = predict.predict(workdir, path, tmp_path / "out", progress=False)
  out = tmp_path / "out"
  pred = pd.read_csv(out / "predictions.csv")
  assert pred["patient_id"].tolist() == new["patient_id"].tolist()
  ref = pd.read_csv(workdir / "predictions.csv").set_index("patient_id").loc[pred["patient_id"]]
  for col in ("risk_os", "risk_dm", "surv_os_2y", "p_os_2y", "p_os_5y", "p_dm_2y", "p_dm_5y"):
    np.testing.assert_allclose(pred[col], ref[col], rtol=1e-5, atol=1e-6, err_msg=col)
  assert np.all(pred["p_os_5y"] >= pred["p_os_2y"]) and np.all(pred["p_dm_5y"] >= pred["p_dm_2y"])
  np.testing.assert_allclose(pred["p_os_2y"], 1 - pred["surv_os_2y"], atol=1e-12)

  curves = pd.read_csv(out / "survival_curves.csv")
  table = pd.read_csv(manifest).set_index("patient_id")
  train_pred = pd.read_csv(workdir / "predictions.csv").query("split == 'train'")
  for o in ("os", "dm"):
    c = curves[curves["outcome"] == o]
    s = c.pivot(index="patient_id", columns="time_days", values="survival").loc[pred["patient_id"]]
    times = s.columns.to_numpy(float)
    np.testing.assert_allclose(np.diff(times), 30.0)
    values = s.to_numpy()
    assert np.all(values >= 0) and np.all(values <= 1)
    assert np.all(np.diff(values, axis=1) <= 1e-12)  # Survival never increases.
    # Reference: scikit-survival's Breslow estimator on the run's training risks.
    tr = table.loc[train_pred["patient_id"]]
    est = BreslowEstimator().fit(train_pred[f"risk_{o}"].to_numpy(),
                                 tr[f"{o}_event"].to_numpy().astype(bool),
                                 tr[f"{o}_time"].to_numpy(float))
    fns = est.get_survival_function(pred[f"risk_{o}"].to_numpy())
    assert times[-1] <= tr.loc[tr[f"{o}_event"] == 1, f"{o}_time"].max()
    ok = times >= fns[0].x[0]  # sksurv's step function is undefined before its first time.
    expected = np.stack([f(times[ok]) for f in fns])
    np.testing.assert_allclose(values[:, ok], expected, rtol=1e-5, atol=1e-7)
  assert summary["n_patients"] == len(new) and summary["best_step"] == 0
  saved = json.loads((out / "summary.json").read_text())
  assert saved["outcomes"] == ["os", "dm"] and saved["heatmaps"] is None
  assert _no_leftovers(tmp_path)
  # An existing, non-empty --out is never overwritten by accident.
  with pytest.raises(FileExistsError, match="not empty"):
    predict.predict(workdir, path, out, progress=False)


def test_heatmaps_on_the_demo_scans(trained, tmp_path):
  workdir, _ = trained
  path, new = _new_patients(trained, tmp_path, n=2)
  new.loc[new.index[1], "age"] = ""  # Imputed with the training mean, and reported.
  new.to_csv(path, index=False)
  out = tmp_path / "out"
  summary = predict.predict(workdir, path, out, heatmaps=True, progress=False)
  assert any(new["patient_id"].iloc[1] in w and "age is missing: imputed" in w
             for w in summary["warnings"])
  pred = pd.read_csv(out / "predictions.csv")
  cams = pd.read_csv(out / "heatmaps" / "heatmaps.csv")
  assert len(cams) == 4 and set(cams["outcome"]) == {"os", "dm"}
  for _, r in cams.iterrows():
    row = new.set_index("patient_id").loc[r["patient_id"]]
    src, heat = nib.load(row["t1c"]), nib.load(out / r["nifti"])
    assert heat.shape == src.shape
    np.testing.assert_allclose(heat.affine, src.affine, atol=1e-4)
    data = heat.get_fdata()
    assert np.all(np.isfinite(data)) and data.min() >= 0 and data.max() <= 1 + 1e-6
    assert (out / r["png"]).stat().st_size > 1000
    risk = pred.set_index("patient_id").loc[r["patient_id"], f"risk_{r['outcome']}"]
    assert r["risk"] == pytest.approx(risk, abs=1e-5)
  assert set(cams["sign"]) == {"increasing"} and summary["heatmaps"]["sign"] == "increasing"
  # The risk-decreasing maps (gradient of minus the log-hazard), said so in the outputs.
  dec = predict.predict(workdir, path, tmp_path / "dec", heatmaps=True, sign="decreasing",
                        progress=False)
  cams_dec = pd.read_csv(tmp_path / "dec" / "heatmaps" / "heatmaps.csv")
  assert set(cams_dec["sign"]) == {"decreasing"} and dec["heatmaps"]["sign"] == "decreasing"
  np.testing.assert_allclose(cams_dec["risk"], cams["risk"], atol=1e-6)
  with pytest.raises(UserError, match="--sign"):
    predict.predict(workdir, path, tmp_path / "bad_sign", heatmaps=True, sign="up",
                    progress=False)


def test_bad_manifests_name_patients_and_files_and_write_nothing(trained, tmp_path):
  workdir, _ = trained
  path, new = _new_patients(trained, tmp_path, n=5)
  bad = new.copy().reset_index(drop=True)
  ids = bad["patient_id"].tolist()
  bad.loc[0, "t2fs"] = str(tmp_path / "nowhere_t2fs.nii.gz")  # Missing file.
  bad.loc[1, "histotype"] = "angiosarcoma"  # A level the run never saw.
  # One channel of two: an error (no image at all goes to the clinical head,
  # see test_patient_without_mri_is_scored_by_the_clinical_head).
  bad.loc[2, "t2fs"] = ""
  bad.loc[3, "sex"] = ""  # Missing categorical value (training had none).
  truncated = tmp_path / "truncated_t1c.nii.gz"
  blob = open(bad.loc[4, "t1c"], "rb").read()
  truncated.write_bytes(blob[: len(blob) // 2])
  bad.loc[4, "t1c"] = str(truncated)  # Corrupt file.
  bad.to_csv(tmp_path / "bad.csv", index=False)
  out = tmp_path / "out"
  with pytest.raises(predict.InputError) as err:
    predict.predict(workdir, tmp_path / "bad.csv", out, heatmaps=True, progress=False)
  kinds = {(p.patient_id, p.kind) for p in err.value.problems}
  assert (ids[0], "missing_file") in kinds
  assert (ids[1], "unknown_level") in kinds
  assert (ids[2], "missing_image") in kinds
  assert (ids[3], "missing_value") in kinds
  assert (ids[4], "corrupt_file") in kinds
  msg = str(err.value)
  for text in ("nowhere_t2fs.nii.gz", "angiosarcoma", "truncated_t1c.nii.gz", "'sex'", *ids):
    assert text in msg, text
  assert not out.exists() and _no_leftovers(tmp_path)

  # One channel where the run has two.
  one = new.drop(columns=["t2fs"])
  one.to_csv(tmp_path / "one_channel.csv", index=False)
  with pytest.raises(predict.InputError, match=r"trained on 2 image channels \['t1c', 't2fs'\]"):
    predict.predict(workdir, tmp_path / "one_channel.csv", out, progress=False)
  # Channels on different grids.
  grid = new.head(1).copy()
  img = sitk.ReadImage(grid["t2fs"].iloc[0])
  small = sitk.Resample(img, [s // 2 for s in img.GetSize()], sitk.Transform(), sitk.sitkLinear,
                        img.GetOrigin(), [2 * s for s in img.GetSpacing()], img.GetDirection())
  sitk.WriteImage(small, str(tmp_path / "half_t2fs.nii.gz"))
  grid["t2fs"] = str(tmp_path / "half_t2fs.nii.gz")
  grid.to_csv(tmp_path / "grid.csv", index=False)
  with pytest.raises(predict.InputError, match=r"shape_mismatch.*half_t2fs\.nii\.gz"):
    predict.predict(workdir, tmp_path / "grid.csv", out, progress=False)
  # Valid files that preprocessing rejects: a channel without contrast in the tumour.
  flat = new.head(2).copy()
  src = nib.load(flat["t2fs"].iloc[1])
  nib.save(nib.Nifti1Image(np.full(src.shape, 7, np.int16), src.affine),
           tmp_path / "flat_t2fs.nii.gz")
  flat.loc[flat.index[1], "t2fs"] = str(tmp_path / "flat_t2fs.nii.gz")
  flat.to_csv(tmp_path / "flat.csv", index=False)
  with pytest.raises(predict.InputError,
                     match=rf"preprocessing_failed.*{flat['patient_id'].iloc[1]}.*zero intensity"):
    predict.predict(workdir, tmp_path / "flat.csv", out, progress=False)
  with pytest.raises(FileNotFoundError, match="missing.csv"):
    predict.predict(workdir, tmp_path / "missing.csv", out, progress=False)
  assert not out.exists() and _no_leftovers(tmp_path)


def _edit_json(path, fn):
  d = json.loads(path.read_text())
  fn(d)
  path.write_text(json.dumps(d))


def test_checkpoint_from_another_model_or_a_broken_run(trained, tmp_path):
  workdir, _ = trained
  path, _ = _new_patients(trained, tmp_path, n=2)

  def copy(name):
    dst = tmp_path / name
    shutil.copytree(workdir, dst)
    return dst

  other = copy("wider")  # The config of a wider network than the checkpoint holds.
  _edit_json(other / "config.json", lambda d: d["model"]["image"].update(growth_rate=3))
  with pytest.raises(predict.CheckpointMismatchError,
                     match=r"does not hold the model(.|\n)*image_encoder/block1_layer1"):
    predict.load_run(other)
  other = copy("image_only")
  _edit_json(other / "config.json", lambda d: d["data"].update(modalities=["image"]))
  with pytest.raises(predict.CheckpointMismatchError, match="not in the model: params/clinical"):
    predict.load_run(other)
  other = copy("one_channel")
  _edit_json(other / "config.json", lambda d: d["data"].update(channels=["t1c"]))
  with pytest.raises(predict.CheckpointMismatchError,
                     match=r"conv0/kernel: model \(3, 3, 3, 1, 4\)"):
    predict.load_run(other)
  other = copy("fusion")
  _edit_json(other / "config.json", lambda d: d["model"].update(name="healnet"))
  with pytest.raises(predict.RunLoadError, match="model 'healnet'; load_run handles MMNN runs"):
    predict.load_run(other)
  other = copy("old_schema")  # A run's config.json from before the one config schema.

  def old_schema(d):
    d["model"]["modalities"] = d["data"].pop("modalities")
    del d["model"]["name"]
  _edit_json(other / "config.json", old_schema)
  assert predict.load_run(other).heads == ("mm", "image", "clinical")
  other = copy("fingerprint")
  _edit_json(other / "preprocess.json", lambda d: d.update(fingerprint="0123456789abcdef"))
  with pytest.raises(predict.RunLoadError, match="MRI pipeline changed since training"):
    predict.load_run(other)
  other = copy("unfinished")
  os.remove(other / "baseline_hazard.json")
  with pytest.raises(predict.RunLoadError, match="baseline_hazard.json: Breslow"):
    predict.predict(other, path, tmp_path / "out", progress=False)
  assert not (tmp_path / "out").exists()


def test_real_brain_scans_through_the_command_line(trained, tmp_path):
  from jaxsurv.data import fetch
  workdir, _ = trained
  try:
    cases = mri.pyradiomics_cases(("brain1", "brain2"))
  except fetch.FetchError as e:  # No registry access: nothing to test against.
    pytest.skip(f"pyradiomics 3.0.1 sdist not available: {e}")
  known = _known_levels(workdir)
  pick = lambda col, want: want if want in known[col] else known[col][0]
  rows = [dict(patient_id=name, t1c=str(img), t2fs=str(img), mask=str(lab), age=60, sex="F",
               location=pick("location", "axial"), histotype=pick("histotype", "other"), grade=2,
               size_cm=4.0, depth="deep", neoadjuvant_chemo=0, mets_at_presentation=0,
               rt_type="post_op", margin="R0")
          for name, (img, lab) in cases.items()]
  manifest = tmp_path / "brain.csv"
  pd.DataFrame(rows).to_csv(manifest, index=False)
  out = tmp_path / "brain_out"
  proc = subprocess.run(
      [sys.executable, "-m", "jaxsurv.predict", f"--workdir={workdir}", f"--manifest={manifest}",
       f"--out={out}", "--heatmaps", "--layer", "last_dense_block", "--no_progress"],
      env=dict(os.environ, PYTHONPATH=subprocess_pythonpath()), capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  pred = pd.read_csv(out / "predictions.csv")
  assert pred["patient_id"].tolist() == ["brain1", "brain2"]
  assert np.all(np.isfinite(pred[["risk_os", "risk_dm", "p_os_2y", "p_dm_5y"]].to_numpy()))
  cams = pd.read_csv(out / "heatmaps" / "heatmaps.csv")
  assert len(cams) == 4
  for _, r in cams.iterrows():
    src = sitk.ReadImage(str(cases[r["patient_id"]][0]))
    heat = sitk.ReadImage(str(out / r["nifti"]))
    assert heat.GetSize() == src.GetSize()
    np.testing.assert_allclose(heat.GetOrigin(), src.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(heat.GetSpacing(), src.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(heat.GetDirection(), src.GetDirection(), atol=1e-5)
    arr = sitk.GetArrayFromImage(heat)
    assert np.all(np.isfinite(arr)) and arr.min() >= 0 and arr.max() <= 1 + 1e-6
    assert (out / r["png"]).is_file()

  # The same command on a bad manifest: exit status 2, the patient named, nothing written.
  rows[1]["mask"] = str(tmp_path / "no_such_label.nrrd")
  pd.DataFrame(rows).to_csv(tmp_path / "brain_bad.csv", index=False)
  code = predict.main([f"--workdir={workdir}", f"--manifest={tmp_path / 'brain_bad.csv'}",
                       f"--out={tmp_path / 'bad_out'}", "--no_progress"])
  assert code == 2 and not (tmp_path / "bad_out").exists()


def _files(folder):
  return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")}


def test_out_at_inside_or_above_the_run_is_refused(trained, tmp_path, capsys):
  workdir, _ = trained
  path, _ = _new_patients(trained, tmp_path, n=2)
  before = _files(workdir.parent)
  for out, extra, text in ((workdir, [], "is the run folder"),
                           (workdir / "predict_new", [], "lies inside the run folder"),
                           (workdir.parent, ["--overwrite"], "contains the run folder")):
    code = predict.main([f"--workdir={workdir}", f"--manifest={path}", f"--out={out}",
                         "--no_progress", *extra])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("jaxsurv: error: --out ") and text in err
    assert str(workdir) in err and "Traceback" not in err
    assert _files(workdir.parent) == before  # The run (and its parent) untouched.
  with pytest.raises(predict.UserError, match="contains the run folder"):
    predict.predict(workdir, path, workdir.parent, overwrite=True, progress=False)
  assert _files(workdir.parent) == before
  # Next to the run is fine.
  code = predict.main([f"--workdir={workdir}", f"--manifest={path}",
                       f"--out={tmp_path / 'next_to_it'}", "--no_progress"])
  assert code == 0 and (tmp_path / "next_to_it" / "predictions.csv").is_file()


def test_patient_without_mri_is_scored_by_the_clinical_head(trained, tmp_path):
  """A multimodal run scores a patient with no image paths by its clinical head,
  marked ``risk_head='clinical'``, with that head's own training Breslow baseline."""
  import jax
  from sksurv.linear_model.coxph import BreslowEstimator
  from jaxsurv import train
  workdir, _ = trained
  path, new = _new_patients(trained, tmp_path, n=6)
  blank = new.copy()
  blank.loc[blank.index[[1, 4]], ["t1c", "t2fs", "mask"]] = ""
  blank.to_csv(tmp_path / "blank.csv", index=False)
  summary = predict.predict(workdir, tmp_path / "blank.csv", tmp_path / "out", progress=False)
  pred = pd.read_csv(tmp_path / "out" / "predictions.csv")
  assert pred["patient_id"].tolist() == new["patient_id"].tolist()
  assert pred["risk_head"].tolist() == ["mm", "clinical", "mm", "mm", "clinical", "mm"]
  assert summary["risk_head"] == {"mm": 4, "clinical": 2}
  assert any("scored by the clinical head" in n for n in summary["notes"])
  full = predict.predict(workdir, path, tmp_path / "full", progress=False)
  ref = pd.read_csv(tmp_path / "full" / "predictions.csv")
  assert set(ref["risk_head"]) == {"mm"} and full["risk_head"] == {"mm": 6}
  mm = pred["risk_head"] == "mm"
  np.testing.assert_allclose(pred.loc[mm, "risk_os"], ref.loc[mm, "risk_os"], rtol=1e-5)
  # The clinical head's risk, computed with any image (the head does not see it).
  run = predict.load_run(workdir)
  clin = predict.clinical_features(run, pd.read_csv(path, dtype=str))
  noise = np.random.default_rng(0).normal(
      size=(len(clin),) + run.preprocess.grid + (2,)).astype(np.float32)
  outs = jax.jit(lambda v, i, c: train.predict_fn(v["params"], v["batch_stats"], i, c,
                                                  model=run.model))(run.variables, noise, clin)
  np.testing.assert_allclose(pred.loc[~mm, ["risk_os", "risk_dm"]],
                             np.asarray(outs["clinical"])[~mm.to_numpy()], rtol=1e-5, atol=1e-6)
  # Its survival: Breslow refitted (scikit-survival) on the clinical head's training risks.
  from jaxsurv.data import splits as splits_lib
  train_ids = list(splits_lib.load_splits(workdir / "splits.json").train)
  heads = json.loads((workdir / "baseline_hazard_heads.json").read_text())
  assert set(heads) == {"image", "clinical"}
  table = pd.read_csv(trained[1]).set_index("patient_id").loc[train_ids]
  train_new = table.reset_index().drop(columns=["os_time", "os_event", "dm_time", "dm_event"])
  x = predict.clinical_features(run, train_new.astype({c: str for c in run.spec.categorical}))
  z = np.zeros((len(x),) + run.preprocess.grid + (2,), np.float32)
  tr = np.asarray(jax.jit(lambda v, i, c: train.predict_fn(
      v["params"], v["batch_stats"], i, c, model=run.model))(run.variables, z, x)["clinical"])
  est = BreslowEstimator().fit(tr[:, 0].astype(float), table["os_event"].to_numpy(int),
                               table["os_time"].to_numpy(float))
  fn = est.get_survival_function(pred.loc[~mm, "risk_os"].to_numpy(float))
  np.testing.assert_allclose(pred.loc[~mm, "surv_os_2y"], [f(730.5) for f in fn], rtol=1e-6,
                             atol=1e-9)
