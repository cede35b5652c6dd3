"""jaxsurv.fusion_predict: scoring label-free patients with a finished fusion run."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from jaxsurv import fusion_predict as fp
from jaxsurv import fusion_train as ft
from jaxsurv.errors import UserError
from test_fusion_train import synthetic_cohort, tiny_config


@pytest.fixture(scope="module")
def healnet_run(tmp_path_factory):
  """A tiny HEALNet run (clinical + omic + WSI bags) trained through launch's entry point."""
  root = tmp_path_factory.mktemp("fusion_predict")
  cohort = synthetic_cohort(wsi=True)
  mp = pytest.MonkeyPatch()
  mp.setattr(ft, "load_cohort", lambda config: cohort)
  cfg = tiny_config("healnet", "clinical+omic+wsi", num_epochs=2)
  cfg.data.n_folds = 3
  ft.train_and_evaluate(cfg, str(root / "run"))
  yield root, cohort, mp
  mp.undo()


def test_label_free_test_patients_get_the_runs_own_risks(healnet_run):
  root, cohort, _ = healnet_run
  run_dir = root / "run"
  written = fp.write_label_free_input(run_dir, root / "in_full", part="test")
  assert list(pd.read_csv(root / "in_full" / "clinical.csv").columns) == [
      "patient_id", "clinical_0", "clinical_1", "clinical_2"]
  for name in ("clinical.csv", "omic.csv", "wsi.csv"):
    assert (root / "in_full" / name).is_file(), name
  # No outcome anywhere in the input.
  for name in ("clinical.csv", "omic.csv"):
    cols = set(pd.read_csv(root / "in_full" / name).columns)
    assert not cols & {"duration", "event", "os_time", "os_event"}
  pred = fp.predict(run_dir, root / "in_full", root / "out_full")
  ref = pd.read_csv(run_dir / "predictions.csv")
  ref = ref[ref.split == "test"].set_index("patient_id")
  got = pred.set_index("patient_id").loc[ref.index]
  assert len(got) == len(written) == len(ref)
  np.testing.assert_allclose(got["risk"], ref["risk"], rtol=1e-5, atol=1e-6)
  for m in ("clinical", "omic", "wsi"):
    np.testing.assert_array_equal(got[f"present_{m}"], ref[f"present_{m}"])
  s = got[[c for c in got.columns if c.startswith("surv_bin")]].to_numpy()
  assert (np.diff(s, axis=1) <= 1e-7).all() and ((s > 0) & (s <= 1)).all()
  assert (root / "out_full" / "healnet_attention_omic.csv").is_file()


def test_a_removed_modality_changes_only_those_patients(healnet_run):
  root, _, _ = healnet_run
  run_dir = root / "run"
  full = fp.predict(run_dir, root / "in_full", root / "out_full2").set_index("patient_id")
  pres = fp.write_label_free_input(run_dir, root / "in_drop", part="test",
                                   drop={"omic": 0.5, "wsi": 0.5}, seed=1)
  pres = pres.set_index("patient_id")
  assert 0 < pres["present_omic"].sum() < len(pres)
  pred = fp.predict(run_dir, root / "in_drop", root / "out_drop").set_index("patient_id")
  pred = pred.loc[full.index]
  for m in ("clinical", "omic", "wsi"):
    np.testing.assert_array_equal(pred[f"present_{m}"], pres.loc[full.index, f"present_{m}"])
  kept = (pres.loc[full.index, ["present_omic", "present_wsi"]] == 1).all(axis=1).to_numpy()
  # HEALNet skips a missing modality per patient: the others are unaffected.
  np.testing.assert_allclose(pred["risk"][kept], full["risk"][kept], rtol=1e-5, atol=1e-6)
  assert not np.allclose(pred["risk"][~kept], full["risk"][~kept])


def test_bad_input_and_output_folders_are_refused(healnet_run, tmp_path):
  root, _, _ = healnet_run
  run_dir = root / "run"
  bad = tmp_path / "bad"
  shutil.copytree(root / "in_full", bad)
  df = pd.read_csv(bad / "omic.csv").drop(columns=["omic_1"])
  df.to_csv(bad / "omic.csv", index=False)
  with pytest.raises(UserError, match=r"omic.csv: columns differ.*missing \['omic_1'\]"):
    fp.predict(run_dir, bad, tmp_path / "o1")
  df = pd.read_csv(root / "in_full" / "clinical.csv").astype({"clinical_0": object})
  df.loc[0, "clinical_0"] = "high"
  df.to_csv(bad / "clinical.csv", index=False)
  shutil.copy(root / "in_full" / "omic.csv", bad / "omic.csv")
  with pytest.raises(UserError, match=rf"clinical.csv: non-numeric values for patients "
                                      rf"\['{df.patient_id[0]}'\] in columns \['clinical_0'\]"):
    fp.predict(run_dir, bad, tmp_path / "o2")
  assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
  with pytest.raises(UserError, match="no modality file"):
    fp.predict(run_dir, tmp_path, tmp_path / "o3")
  before = sorted(p.name for p in run_dir.iterdir())
  for out in (run_dir, run_dir / "preds", root):
    with pytest.raises(UserError):
      fp.predict(run_dir, root / "in_full", out)
  assert sorted(p.name for p in run_dir.iterdir()) == before
  with pytest.raises(UserError, match="not found"):
    fp.predict(tmp_path / "nope", root / "in_full", tmp_path / "o4")


def test_command_lines_write_input_and_predict(healnet_run, capsys):
  """``python -m jaxsurv.data input RUN`` then ``python -m jaxsurv.predict --input``."""
  from jaxsurv import predict
  from jaxsurv.data import __main__ as data_cli
  root, _, _ = healnet_run
  run_dir, inp, out = root / "run", root / "cli_in", root / "cli_out"
  assert data_cli.main(["input", str(run_dir), f"--out={inp}", "--part=test",
                        "--drop-modalities=omic:0.5", "--seed=3"]) == 0
  assert "patients of part 'test'" in capsys.readouterr().out
  assert predict.main([f"--workdir={run_dir}", f"--input={inp}", f"--out={out}"]) == 0
  pred = pd.read_csv(out / "predictions.csv")
  written = pd.read_csv(inp / "omic.csv")
  assert set(pred.loc[pred.present_omic == 1, "patient_id"]) == set(written.patient_id)
  # A fusion run given an MMNN manifest: one clear line, exit 2.
  assert predict.main([f"--workdir={run_dir}", "--manifest=x.csv", f"--out={root / 'o9'}"]) == 2
  assert "is a fusion run: give --input=FOLDER" in capsys.readouterr().err
