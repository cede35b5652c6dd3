"""Tests for jaxsurv.runs (run folders) and jaxsurv.cli (how commands end).

The run-folder rules are checked on plain folders; the trainer wiring on one
tiny MMNN run (sarcoma_phantom, 32 patients, 16^3, 1 epoch) reused across
the assertions: a changed config is refused before any work, the same
command resumes, ``allow_changed_config`` continues and keeps the old config,
a changed cohort is refused, and ``launch.py`` with a bad manifest ends with
one line. The command endings run tiny absl programs in subprocesses.
"""

import dataclasses
import errno
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import ml_collections
import numpy as np
import pytest

from conftest import REPO, subprocess_pythonpath, tiny_mmnn_config
from jaxsurv import cli, runs
from jaxsurv.data import multimodal as mm
from jaxsurv.errors import UserError


def _env(**extra):
  return dict(os.environ, PYTHONPATH=subprocess_pythonpath(), **extra)


def _snapshot(folder: pathlib.Path) -> dict:
  """``{relative path: (size, mtime_ns)}`` of every file below ``folder``."""
  return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
          for p in sorted(folder.rglob("*")) if p.is_file()}


def _config(**over):
  c = ml_collections.ConfigDict(dict(
      seed=0, num_epochs=3, progress_bar=True, log_every_steps=10,
      data=dict(fold=0, stratify=("event",), prepare_workers=2),
      model=dict(name="concat", hidden=(8, 4))))
  c.update_from_flattened_dict(over)
  return runs.config_to_dict(c)


# ----------------------------------------------------------------------------
# Config data and fingerprints.
# ----------------------------------------------------------------------------


def test_config_to_dict_and_fingerprint_are_stable():
  d = _config()
  assert d["data"]["stratify"] == ["event"] and d["model"]["hidden"] == [8, 4]
  assert json.loads(json.dumps(d)) == d  # JSON-safe.
  reordered = {k: d[k] for k in reversed(list(d))}
  assert runs.fingerprint(reordered) == runs.fingerprint(d)
  assert len(runs.fingerprint(d)) == 64
  assert runs.fingerprint(_config(**{"data.fold": 1})) != runs.fingerprint(d)
  assert runs.config_to_dict({"a": (1, 2), "b": {"c": None}}) == {"a": [1, 2], "b": {"c": None}}
  # Fields that do not change what is trained do not change the config fingerprint.
  same = _config(progress_bar=False, log_every_steps=1, **{"data.prepare_workers": 8})
  assert runs.config_fingerprint(same) == runs.config_fingerprint(d)
  assert runs.config_changes(d, same) == []
  assert runs.config_changes(d, _config(**{"data.fold": 1, "model.hidden": (8,)})) == [
      "data.fold: 0 -> 1", "model.hidden: [8,4] -> [8]"]
  assert runs.config_changes({"a": 1}, {"b": 2}) == ["a: 1 -> <absent>", "b: <absent> -> 2"]


def test_cohort_fingerprints_change_with_patients_or_outcomes():
  n = 6
  def cohort(event=None, ids=None):
    return mm.MultimodalCohort(np.array(ids or [f"p{i}" for i in range(n)]),
                               {"clinical": np.ones((n, 2), np.float32)}, {},
                               {"clinical": np.ones(n, bool)}, np.arange(1.0, n + 1),
                               np.array(event if event is not None else [1, 0] * 3))
  base = runs.multimodal_cohort_fingerprint(cohort())
  assert runs.multimodal_cohort_fingerprint(cohort()) == base
  assert runs.multimodal_cohort_fingerprint(cohort(event=[1, 1, 1, 0, 0, 0])) != base
  assert runs.multimodal_cohort_fingerprint(cohort(ids=[f"q{i}" for i in range(n)])) != base


# ----------------------------------------------------------------------------
# open_run.
# ----------------------------------------------------------------------------


def test_open_run_new_same_ignored_and_changed(tmp_path):
  wd = tmp_path / "a" / "run"
  cfg = _config()
  assert runs.open_run(wd, cfg, "cohort1") == wd
  record = json.loads((wd / "run.json").read_text())
  assert record["config"] == cfg and json.loads((wd / "config.json").read_text()) == cfg
  assert record["config_fingerprint"] == runs.config_fingerprint(cfg)
  assert record["cohort_fingerprint"] == "cohort1" and record["history"] == []
  assert record["jaxsurv_version"] and record["created"]
  assert sorted(p.name for p in wd.iterdir()) == ["config.json", "run.json"]  # No temp files.

  before = _snapshot(wd)
  runs.open_run(wd, cfg, "cohort1")  # The same run: accepted, nothing rewritten.
  assert _snapshot(wd) == before

  quiet = _config(progress_bar=False)  # Only an ignored field: accepted, recorded, no history.
  runs.open_run(wd, quiet, "cohort1")
  assert json.loads((wd / "config.json").read_text())["progress_bar"] is False
  assert json.loads((wd / "run.json").read_text())["history"] == []

  (wd / "checkpoints").mkdir()
  before = _snapshot(wd)
  with pytest.raises(UserError) as err:
    runs.open_run(wd, _config(progress_bar=False, num_epochs=5, **{"data.fold": 1}), "cohort2")
  msg = str(err.value)
  for text in ("data.fold: 0 -> 1", "num_epochs: 3 -> 5", "cohort changed: cohort1 -> cohort2",
               "new --workdir", "--allow_changed_config", "Nothing was written"):
    assert text in msg, text
  assert "progress_bar" not in msg
  assert _snapshot(wd) == before


def test_open_run_allow_changed_keeps_every_earlier_config(tmp_path):
  wd = tmp_path / "run"
  first, second, third = _config(), _config(num_epochs=5), _config(num_epochs=5, seed=1)
  runs.open_run(wd, first, "c1")
  runs.open_run(wd, second, "c1", allow_changed=True)
  assert json.loads((wd / "config.1.json").read_text()) == first
  assert json.loads((wd / "config.json").read_text()) == second
  runs.open_run(wd, third, "c2", allow_changed=True)
  assert json.loads((wd / "config.2.json").read_text()) == second
  assert json.loads((wd / "config.json").read_text()) == third
  record = json.loads((wd / "run.json").read_text())
  assert record["config"] == third and record["cohort_fingerprint"] == "c2"
  assert [h["config_file"] for h in record["history"]] == ["config.1.json", "config.2.json"]
  assert record["history"][0]["changes"] == ["num_epochs: 3 -> 5"]
  assert record["history"][1]["changes"] == ["seed: 0 -> 1", "cohort changed: c1 -> c2"]
  assert record["history"][1]["config_fingerprint"] == runs.config_fingerprint(second)
  assert record["history"][0]["until"] == record["history"][1]["since"]
  runs.open_run(wd, third, "c2")  # And the continued run now resumes as itself.


def test_open_run_refuses_unusable_folders(tmp_path, monkeypatch):
  cfg = _config()
  (tmp_path / "file").write_text("x")
  with pytest.raises(UserError, match="exists and is not a folder"):
    runs.open_run(tmp_path / "file", cfg, "c")
  with pytest.raises(UserError, match="cannot be created, .*file is not a folder"):
    runs.open_run(tmp_path / "file" / "run", cfg, "c")
  foreign = tmp_path / "foreign"
  foreign.mkdir()
  (foreign / "notes.txt").write_text("mine")
  with pytest.raises(UserError, match=r"not empty \(notes.txt\) and holds no jaxsurv run"):
    runs.open_run(foreign, cfg, "c")
  assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]

  locked, missing = tmp_path / "locked", tmp_path / "ro" / "deeper" / "run"
  locked.mkdir()
  (tmp_path / "ro").mkdir()
  real_access = os.access
  denied = {str(locked), str(tmp_path / "ro")}
  monkeypatch.setattr(os, "access", lambda p, mode: str(p) not in denied and real_access(p, mode))
  with pytest.raises(UserError, match="locked: folder is not writable"):
    runs.open_run(locked, cfg, "c")
  with pytest.raises(UserError, match=r"cannot be created, .*ro is not writable"):
    runs.open_run(missing, cfg, "c")
  assert not (tmp_path / "ro" / "deeper").exists() and not any(locked.iterdir())

  damaged = tmp_path / "damaged"
  damaged.mkdir()
  (damaged / "run.json").write_text("{not json")
  with pytest.raises(UserError, match="run.json: not valid JSON"):
    runs.open_run(damaged, cfg, "c")


def test_open_run_adopts_an_older_run_with_the_same_config(tmp_path):
  old = tmp_path / "old"
  old.mkdir()
  cfg = _config()
  (old / "config.json").write_text(json.dumps(cfg))
  (old / "results.json").write_text("{}")
  with pytest.raises(UserError, match="seed: 0 -> 1"):
    runs.open_run(old, _config(seed=1), "c")
  assert not (old / "run.json").exists()
  runs.open_run(old, cfg, "c")
  record = json.loads((old / "run.json").read_text())
  assert record["config"] == cfg and record["cohort_fingerprint"] == "c"
  no_config = tmp_path / "no_config"
  (no_config / "checkpoints").mkdir(parents=True)
  with pytest.raises(UserError, match="without config.json"):
    runs.open_run(no_config, cfg, "c")


# ----------------------------------------------------------------------------
# refuse_output_near_runs.
# ----------------------------------------------------------------------------


def test_refuse_output_near_runs(tmp_path):
  run = tmp_path / "runs" / "mmnn"
  runs.open_run(run, _config(), "c")
  for out, text in ((run, "is the run folder"), (run / "predict", "lies inside the run folder"),
                    (run / "a" / "b", "lies inside the run folder"),
                    (tmp_path / "runs", "contains the run folder"),
                    (tmp_path, "contains the run folder")):
    with pytest.raises(UserError, match=text) as err:
      runs.refuse_output_near_runs(out)
    assert str(run) in str(err.value)
  runs.refuse_output_near_runs(tmp_path / "runs" / "mmnn_predict")  # A sibling is fine.
  runs.refuse_output_near_runs(tmp_path / "elsewhere" / "new")
  # Older runs without run.json: checkpoints/, or config.json with results.json.
  older = tmp_path / "older" / "deep" / "run"
  (older / "checkpoints").mkdir(parents=True)
  with pytest.raises(UserError, match="contains the run folder .*older/deep/run"):
    runs.refuse_output_near_runs(tmp_path / "older")
  cv_fold = tmp_path / "cv" / "fold0"
  cv_fold.mkdir(parents=True)
  (cv_fold / "config.json").write_text("{}")
  runs.refuse_output_near_runs(cv_fold / "x")  # A config file alone is no run.
  (cv_fold / "results.json").write_text("{}")
  with pytest.raises(UserError, match="lies inside"):
    runs.refuse_output_near_runs(cv_fold / "x")
  # Through a symbolic link to the run.
  (tmp_path / "link").symlink_to(run)
  with pytest.raises(UserError, match="is the run folder"):
    runs.refuse_output_near_runs(tmp_path / "link")


# ----------------------------------------------------------------------------
# jaxsurv.cli: how commands end.
# ----------------------------------------------------------------------------


_PROGRAM = textwrap.dedent('''
    import errno, sys
    from absl import flags
    from jaxsurv import cli
    from jaxsurv.errors import TrainingError, UserError
    KIND = flags.DEFINE_string("kind", "ok", "what to raise")

    def main(argv):
      k = KIND.value
      if k == "user":
        raise UserError("manifest new.csv: column 'age' is missing")
      if k == "training":
        raise TrainingError("non-finite training loss in epoch 3")
      if k == "enospc":
        try:
          raise OSError(errno.ENOSPC, "No space left on device", "/ckpt/7")
        except OSError as e:
          raise ValueError("orbax: could not save the checkpoint") from e
      if k == "missing":
        open("/no/such/file.csv")
      if k == "bug":
        return len(None)
      if k == "valueerror":
        raise ValueError("a plain ValueError is a bug")
      print("done")
      return 0

    cli.run(main)
''')


@pytest.fixture(scope="module")
def program(tmp_path_factory):
  path = tmp_path_factory.mktemp("cli") / "prog.py"
  path.write_text(_PROGRAM)
  return path


def _run(program, *args):
  return subprocess.run([sys.executable, str(program), *args], capture_output=True, text=True,
                        env=_env(), timeout=120)


@pytest.mark.parametrize("kind,code,text", [
    ("user", 2, "jaxsurv: error: manifest new.csv: column 'age' is missing"),
    ("training", 3, "jaxsurv: error: non-finite training loss in epoch 3"),
    ("enospc", 2, "jaxsurv: error: No space left on device: /ckpt/7 (surfaced as "
                  "builtins.ValueError)"),
    ("missing", 2, "jaxsurv: error: No such file or directory: /no/such/file.csv"),
])
def test_user_training_and_environment_errors_end_with_one_line(program, kind, code, text):
  proc = _run(program, f"--kind={kind}")
  assert proc.returncode == code, proc.stderr
  assert proc.stderr.strip().splitlines() == [text]
  assert "Traceback" not in proc.stderr
  debug = _run(program, f"--kind={kind}", "--debug")
  assert debug.returncode != 0 and "Traceback" in debug.stderr


@pytest.mark.parametrize("kind,name", [("bug", "TypeError"), ("valueerror", "ValueError")])
def test_bugs_keep_their_traceback(program, kind, name):
  proc = _run(program, f"--kind={kind}")
  assert proc.returncode == 1
  assert "Traceback" in proc.stderr and name in proc.stderr
  assert "jaxsurv: error" not in proc.stderr


def test_success_and_reportable_chains(program):
  proc = _run(program)
  assert proc.returncode == 0 and proc.stdout.strip() == "done"
  # A bug raised while handling an environment error is reported by its root.
  try:
    try:
      raise PermissionError(errno.EACCES, "Permission denied", "/data")
    except PermissionError as e:
      raise RuntimeError("tfds failed") from e
  except RuntimeError as e:
    wrapped = e
  assert isinstance(cli.reportable(wrapped), PermissionError)
  assert cli.error_message(wrapped).startswith("Permission denied: /data")
  assert cli.reportable(OSError(errno.EEXIST, "File exists")) is None
  assert cli.reportable(KeyError("P003")) is None
  with pytest.raises(ValueError, match="not a user"):
    cli.error_message(KeyError("x"))


def test_call_in_process(capsys):
  from absl import flags

  def define(fv, argv):
    del argv
    flags.DEFINE_integer("n", 1, "n", flag_values=fv)

  def main(argv, fv):
    if fv.n < 0:
      raise UserError(f"--n must be >= 0, got {fv.n}")
    return len(argv) - 1

  assert cli.call(main, define, ["a", "b", "--n=2"]) == 2
  assert cli.call(main, define, ["--n=-1"]) == 2
  assert capsys.readouterr().err.strip() == "jaxsurv: error: --n must be >= 0, got -1"
  assert cli.call(main, define, ["--n=x"]) == 1
  assert "flags parsing error" in capsys.readouterr().err
  with pytest.raises(UserError):
    cli.call(main, define, ["--n=-1", "--debug"])


# ----------------------------------------------------------------------------
# The trainers: one tiny MMNN run reused across the assertions.
# ----------------------------------------------------------------------------


def _tiny(**over):
  return tiny_mmnn_config(**{"data.prepare_workers": 1, "num_epochs": 1,
                             "eval.bootstrap_resamples": 0, **over})


@pytest.fixture(scope="module")
def mmnn_run(tmp_path_factory):
  """``(root, workdir, results)`` of one finished 1-epoch tiny MMNN run."""
  from jaxsurv import train
  root = tmp_path_factory.mktemp("runs")
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv("JAXSURV_CACHE", str(root / "cache"))
    results = train.train_and_evaluate(_tiny(), str(root / "run"))
  return root, root / "run", results


def test_mmnn_changed_config_is_refused_same_command_resumes_allowed_continues(mmnn_run,
                                                                              monkeypatch):
  from jaxsurv import train
  root, wd, first = mmnn_run
  monkeypatch.setenv("JAXSURV_CACHE", str(root / "cache"))
  record = json.loads((wd / "run.json").read_text())
  assert record["config"] == runs.config_to_dict(_tiny())
  assert json.loads((wd / "config.json").read_text()) == record["config"]
  original_config = (wd / "config.json").read_bytes()

  # A changed config stops before any work, naming the field; nothing changes.
  before = _snapshot(wd)
  with pytest.raises(UserError, match=r"(?s)num_epochs: 1 -> 2.*--allow_changed_config"):
    train.train_and_evaluate(_tiny(num_epochs=2), str(wd))
  assert _snapshot(wd) == before

  # A changed cohort is refused by open_run (one outcome value edited); with
  # allow_changed_config, a kept splits.json that names a patient the cohort
  # lacks is refused too (it used to end in a bare KeyError).
  real_load = train.load_cohort

  def edited(config):
    p = real_load(config)
    table = p.table.copy()
    table.loc[0, "os_time"] = float(table.loc[0, "os_time"]) + 1.0
    return dataclasses.replace(p, table=table)

  def smaller(config):
    p = real_load(config)
    keep = np.arange(len(p.patient_ids)) != 0
    return dataclasses.replace(
        p, patient_ids=p.patient_ids[keep], table=p.table[keep].reset_index(drop=True),
        images=p.images[keep], masks=None if p.masks is None else p.masks[keep],
        image_present=p.image_present[keep])

  monkeypatch.setattr(train, "load_cohort", edited)
  with pytest.raises(UserError, match="cohort changed: [0-9a-f]{12} -> [0-9a-f]{12}"):
    train.train_and_evaluate(_tiny(), str(wd))
  monkeypatch.setattr(train, "load_cohort", smaller)
  with pytest.raises(UserError, match="cohort changed: "):
    train.train_and_evaluate(_tiny(), str(wd))
  with pytest.raises(UserError, match=r"splits.json names 1 patients absent from cohort"):
    train.train_and_evaluate(_tiny(), str(wd), allow_changed_config=True)
  assert _snapshot(wd) == before
  monkeypatch.setattr(train, "load_cohort", real_load)

  # The same command resumes: the finished epoch is not trained again.
  steps = sorted(p.name for p in (wd / "checkpoints").iterdir())
  again = train.train_and_evaluate(_tiny(progress_bar=True), str(wd))  # An ignored field.
  assert sorted(p.name for p in (wd / "checkpoints").iterdir()) == steps
  assert again["best_epoch"] == first["best_epoch"]
  for o in ("os", "dm"):
    assert again["test"][o]["cindex"] == pytest.approx(first["test"][o]["cindex"], abs=1e-6)
  assert json.loads((wd / "run.json").read_text())["history"] == []

  # --allow_changed_config continues the run and keeps the old config.
  more = train.train_and_evaluate(_tiny(num_epochs=2), str(wd), allow_changed_config=True)
  assert more["best_epoch"] in (0, 1)
  old = json.loads((wd / "config.1.json").read_text())
  assert old == {**json.loads(original_config), "progress_bar": True}
  assert old["num_epochs"] == 1 and json.loads((wd / "config.json").read_text())["num_epochs"] == 2
  history = json.loads((wd / "run.json").read_text())["history"]
  assert [h["changes"] for h in history] == [["num_epochs: 1 -> 2"]]
  assert set(p.name for p in (wd / "checkpoints").iterdir()) - set(steps)  # Epoch 1 was trained.


def test_launch_with_a_bad_manifest_ends_with_one_line_and_writes_nothing(tmp_path):
  wd = tmp_path / "wd"
  proc = subprocess.run(
      [sys.executable, str(REPO / "launch.py"),
       f"--config={REPO / 'configs' / 'mmnn.py'}:local,cohort={tmp_path / 'nowhere' / 'new.csv'}",
       f"--workdir={wd}"],
      capture_output=True, text=True, timeout=300, cwd=tmp_path,
      env=_env(JAXSURV_CACHE=str(tmp_path / "cache")))
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr
  lines = [line for line in proc.stderr.splitlines() if line.strip()]
  assert lines == [f"jaxsurv: error: cohort manifest not found: {tmp_path / 'nowhere' / 'new.csv'}"]
  assert not wd.exists()


@pytest.mark.parametrize("item", ["state", "meta"])
def test_truncated_checkpoint_ends_with_one_line(mmnn_run, tmp_path, item):
  """A corrupt checkpoint: a clear message naming it, exit 2, no traceback, nothing lost."""
  import shutil
  root, wd, _ = mmnn_run
  run = tmp_path / "run"
  shutil.copytree(wd, run)
  # Earlier tests may have continued the module's run: take its latest epoch and config.
  latest = max(int(d.name) for d in (run / "checkpoints").iterdir() if d.name.isdigit())
  files = sorted((p for p in (run / "checkpoints" / str(latest) / item).rglob("*")
                  if p.is_file()), key=lambda p: p.stat().st_size)
  victim = files[-1]  # The item's largest file: cut it in half.
  victim.write_bytes(victim.read_bytes()[:victim.stat().st_size // 2])
  cfg = tmp_path / "tiny_config.py"
  cfg.write_text(textwrap.dedent(f"""
      import json
      import ml_collections
      def get_config():
        return ml_collections.ConfigDict(json.load(open({str(run / 'config.json')!r})))
      """))
  before = _snapshot(run)
  proc = subprocess.run([sys.executable, str(REPO / "launch.py"), f"--config={cfg}",
                         f"--workdir={run}"], capture_output=True, text=True, timeout=600,
                        cwd=tmp_path, env=_env(JAXSURV_CACHE=str(root / "cache")))
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr and "Event loop" not in proc.stderr, proc.stderr[-3000:]
  errors = [line for line in proc.stderr.splitlines() if line.startswith("jaxsurv: error:")]
  assert len(errors) == 1 and errors[0].startswith(
      f"jaxsurv: error: cannot restore checkpoint {latest} in {run / 'checkpoints'}"), proc.stderr
  assert proc.stderr.strip().splitlines()[-1] == errors[0]
  assert _snapshot(run) == before


def test_blending_holdout_too_small_is_refused_with_the_stratum_counts():
  """Every (os_event, dm_event) stratum under 5 patients: the 10% hold-out is empty."""
  import pandas as pd
  from jaxsurv import train
  ids = np.array([f"P{i:02d}" for i in range(12)])
  table = pd.DataFrame({"patient_id": ids, "os_event": [0, 0, 0, 1, 1, 1, 0, 0, 0, 1, 1, 1],
                        "dm_event": [0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1]})
  config = ml_collections.ConfigDict(dict(
      data=dict(outcomes=("os", "dm")), blend=dict(holdout_fraction=0.1)))
  fit, held = train._holdout(ids, table, 0.1, seed=0)
  assert len(held) == 0 and len(fit) == 12
  with pytest.raises(UserError, match=r"has no patients; training patients per stratum: "
                                      r"os/dm=00: 3, os/dm=01: 3, os/dm=10: 3, os/dm=11: 3\. .*"
                                      r"--config.blend.enabled=False"):
    train.check_holdout(fit, held, table, config)
  fit, held = train._holdout(ids, table, 0.34, seed=0)  # One per stratum: fine.
  assert len(held) == 4
  train.check_holdout(fit, held, table, config)
