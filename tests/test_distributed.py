"""Multi-process training (jaxsurv.distributed) with 1, 2 and 3 CPU processes on 127.0.0.1.

Each run spawns ``tests/multiprocess_worker.py`` once per process (never
``jax.distributed.initialize`` inside pytest), on a free port, with short
distributed timeouts and an outer timeout; every process started is killed
by PID if it is still alive at the end. A run of N processes must give the
same first-batch loss and gradient, the same parameters after two epochs of
SGD and the same validation outputs as one process (float32 tolerance),
while the loss of one process's half of the batch alone differs (the Cox
risk set is the global batch). Also: a checkpoint written by 2 processes is
resumed by 2 processes, a missing peer ends the process within a bounded
time naming the peers it waited for, and the flags' errors.
"""

import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO, subprocess_pythonpath, subprocess_xla_flags
from jaxsurv import distributed
from jaxsurv.errors import UserError

WORKER = REPO / "tests" / "multiprocess_worker.py"
OUTER_TIMEOUT = 240


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start(kind, n, out: pathlib.Path, *, epochs=2, batch=12, only=None, timeout="20"):
  """Starts processes ``only`` (default all) of an ``n``-process run."""
  out.mkdir(parents=True, exist_ok=True)
  port = _free_port() if n > 1 else 0
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=subprocess_pythonpath(), WORKER_TIMEOUT=timeout)
  env["XLA_FLAGS"] = subprocess_xla_flags()  # No device-count flags.
  return [subprocess.Popen(
      [sys.executable, str(WORKER), kind, str(n), str(pid), str(port), str(out), str(epochs),
       str(batch)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
          for pid in (range(n) if only is None else only)]


def _finish(*runs):
  """Waits for runs started by ``_start`` (at most ``OUTER_TIMEOUT`` s in all);
  returns ``[(returncode, stderr, seconds)]`` per process, run by run. Every
  process still alive at the end is killed by PID."""
  t0 = time.time()
  procs = [p for run in runs for p in run]
  try:
    results = []
    for p in procs:
      _, err = p.communicate(timeout=max(1.0, OUTER_TIMEOUT - (time.time() - t0)))
      results.append((p.returncode, err, time.time() - t0))
    return results
  finally:
    for p in procs:
      if p.poll() is None:
        os.kill(p.pid, signal.SIGKILL)
        p.wait()


def _run(kind, n, out: pathlib.Path, **kw):
  return _finish(_start(kind, n, out, **kw))


def _ok(results):
  for rc, err, _ in results:
    assert rc == 0, err[-3000:]


def _load(out, pid=0):
  with np.load(out / f"process{pid}.npz", allow_pickle=False) as f:
    return {k: f[k] for k in f.files}


def _assert_same(one, many):
  scale = max(1.0, float(np.abs(one["grad"]).max()))
  assert many["process_count"] > 1 and one["process_count"] == 1
  np.testing.assert_allclose(many["loss"], one["loss"], rtol=1e-6)
  np.testing.assert_allclose(many["grad"], one["grad"], atol=1e-6 * scale)
  np.testing.assert_allclose(many["params"], one["params"], atol=2e-6)
  np.testing.assert_allclose(many["val_out"], one["val_out"], atol=2e-6)
  np.testing.assert_allclose(many["train_loss"], one["train_loss"], rtol=1e-5)
  np.testing.assert_allclose(many["val_loss"], one["val_loss"], rtol=1e-5)
  # The check can fail: a per-process risk set gives another loss.
  assert abs(float(one["half_loss"]) - float(one["loss"])) > 1e-3


@pytest.fixture(scope="module")
def fusion(tmp_path_factory):
  """The fusion worker on 1, 2 and 3 processes, started together (6 processes)."""
  out = {n: tmp_path_factory.mktemp(f"fusion{n}") for n in (1, 2, 3)}
  _ok(_finish(*[_start("fusion", n, out[n]) for n in (1, 2, 3)]))
  return out


def test_fusion_two_processes_equal_one_and_resume(fusion):
  one, a, b = _load(fusion[1]), _load(fusion[2], 0), _load(fusion[2], 1)
  _assert_same(one, a)
  for k in a:  # Both processes hold the same global results.
    np.testing.assert_array_equal(a[k], b[k])
  assert a["resumed_from"] == -1
  # The checkpoint the two processes wrote (Orbax, multi-process) is resumed.
  _ok(_run("fusion", 2, fusion[2], epochs=3))
  c = _load(fusion[2], 0)
  assert c["resumed_from"] == 2 and len(c["train_loss"]) == 3
  np.testing.assert_array_equal(c["train_loss"][:2], a["train_loss"])


def test_fusion_three_processes_equal_one(fusion):
  _assert_same(_load(fusion[1]), _load(fusion[3], 2))


def test_mmnn_two_processes_equal_one(tmp_path):
  _ok(_finish(_start("mmnn", 1, tmp_path / "one"), _start("mmnn", 2, tmp_path / "two")))
  _assert_same(_load(tmp_path / "one"), _load(tmp_path / "two", 1))


def test_a_missing_peer_ends_the_process_naming_it(tmp_path):
  (rc, err, seconds), = _run("fusion", 2, tmp_path, only=[1], timeout="3")
  assert rc != 0
  assert seconds < 60
  assert "waited for process 0" in err and "jaxsurv: error: process 1 of 2" in err


# ---------------------------------------------------------------- settings


def test_settings_from_flags_and_environment():
  assert distributed.settings("auto", env={}) is None
  assert distributed.settings("off", "h:1", 2, 0, env={}) is None
  assert distributed.settings("auto", "h:1", 2, 1, env={}) == {
      "coordinator_address": "h:1", "num_processes": 2, "process_id": 1}
  env = {"JAXSURV_COORDINATOR": "h:2", "JAXSURV_NUM_PROCESSES": "3",
         "JOB_COMPLETION_INDEX": "2"}
  assert distributed.settings("auto", env=env) == {
      "coordinator_address": "h:2", "num_processes": 3, "process_id": 2}
  # Slurm under srun: JAX detects the rest.
  assert distributed.settings("auto", env={"SLURM_NTASKS": "4"}) == {
      "coordinator_address": None, "num_processes": None, "process_id": None}
  assert distributed.settings("auto", env={"SLURM_NTASKS": "1"}) is None
  assert distributed.settings("on", env={}) == {
      "coordinator_address": None, "num_processes": None, "process_id": None}
  with pytest.raises(UserError, match="needs --coordinator_address"):
    distributed.settings("auto", None, 2, 0, env={})
  with pytest.raises(UserError, match=r"must be in \[0, 2\)"):
    distributed.settings("auto", "h:1", 2, 2, env={})
  with pytest.raises(UserError, match="not an integer"):
    distributed.settings("auto", env={"JAXSURV_NUM_PROCESSES": "two"})


def test_one_process_helpers():
  assert distributed.process_count() == 1 and distributed.is_primary()
  assert distributed.local_rows(12) == slice(0, 12)
  x = {"a": np.arange(3)}
  np.testing.assert_array_equal(distributed.to_host(x)["a"], x["a"])
  distributed.barrier("noop")  # no-op on one process


def test_launch_refuses_processes_without_a_coordinator(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "launch.py", "--config=configs/fusion.py:local",
                         f"--workdir={tmp_path / 'w'}", "--num_processes=2", "--process_id=0"],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "jaxsurv: error: --num_processes=2 needs --coordinator_address" in proc.stderr
  assert "Traceback" not in proc.stderr
  assert not (tmp_path / "w").exists()
