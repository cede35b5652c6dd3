"""SarcNet's real Flower deployment on 127.0.0.1: a SuperLink, two SuperNodes, ``flwr run``.

Each SuperNode reads only its own site folder (``--node-config``); the app is
the bundle in ``flower/`` (``jaxsurv.federated_app``). After 2 rounds (without
per-round validation, which test_sarcnet.py covers) every
round's global model is checked against FedAvg computed here by hand from
the two sites' local updates, and every process the test started (and each
of their children) is stopped by PID.
"""

from __future__ import annotations

import json
import os
import pathlib
import shlex
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import psutil
import pytest

from jaxsurv import federated, federated_app
from jaxsurv.data import sites as sites_lib

from conftest import REPO, subprocess_pythonpath, tiny_site

BIN = pathlib.Path(sys.executable).parent
SPEC = "configs/sarcnet.py:local"
OVERRIDES = " ".join([
    "data.columns=" + shlex.quote("('age','size_band','grade')"),
    "data.log1p=" + shlex.quote("()"),
    "federated.rounds=2", "federated.local_epochs=1", "batch_size=16", "eval_batch_size=32",
    "federated.timeout_s=240.0",
    # No per-round validation: 4 ClientApp processes fewer (the in-process
    # test in test_sarcnet.py covers the evaluate messages).
    "federated.evaluate=False"])


def _toml(value) -> str:
  """A TOML string (Flower's --node-config and --run-config are TOML)."""
  return json.dumps(str(value))


def _free_ports(n):
  socks = [socket.socket() for _ in range(n)]
  for s in socks:
    s.bind(("127.0.0.1", 0))
  ports = [s.getsockname()[1] for s in socks]
  for s in socks:
    s.close()
  return ports


def _wait_for_port(port: int, proc, timeout: float = 60.0) -> None:
  """Until something listens on 127.0.0.1:``port`` (``proc`` still alive)."""
  deadline = time.time() + timeout
  while time.time() < deadline and proc.poll() is None:
    with socket.socket() as s:
      if s.connect_ex(("127.0.0.1", port)) == 0:
        return
    time.sleep(0.2)
  raise AssertionError(f"nothing listens on port {port} after {timeout:.0f} s")


def _env(home: pathlib.Path) -> dict:
  """The environment of a Flower process: the venv's commands (Flower starts
  ``flower-superexec``), jaxsurv importable, its own Flower home, the test's
  compilation cache."""
  cache = pathlib.Path(jax.config.jax_compilation_cache_dir)
  path = os.pathsep.join([str(BIN), os.environ.get("PATH", "")])
  return dict(os.environ, PATH=path, PYTHONPATH=subprocess_pythonpath(), FLWR_HOME=str(home), JAX_PLATFORMS="cpu",
              JAX_COMPILATION_CACHE_DIR=str(cache),
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.2",
              JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", XLA_PYTHON_CLIENT_PREALLOCATE="false")


def _stop(procs) -> list[int]:
  """Stops each started process and every child of it (by PID): SIGTERM, then
  SIGKILL after 10 s. Returns the PIDs still alive afterwards."""
  pids = set()
  for p in procs:
    pids.add(p.pid)
    try:
      pids.update(c.pid for c in psutil.Process(p.pid).children(recursive=True))
    except psutil.NoSuchProcess:
      pass
  for sig in (signal.SIGTERM, signal.SIGKILL):
    for pid in pids:
      try:
        os.kill(pid, sig)
      except ProcessLookupError:
        pass
    deadline = time.time() + 10
    while time.time() < deadline and any(psutil.pid_exists(pid) and psutil.Process(pid).status()
                                         != psutil.STATUS_ZOMBIE for pid in pids):
      time.sleep(0.2)
    for p in procs:
      if p.poll() is None:
        try:
          p.wait(timeout=1)
        except subprocess.TimeoutExpired:
          pass
  alive = []
  for pid in pids:
    try:
      if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
        alive.append(pid)
    except psutil.NoSuchProcess:
      pass
  return alive


@pytest.mark.slow
def test_superlink_and_two_supernodes_run_fedavg_rounds(tmp_path):
  sites = [tiny_site("a", 72, 0), tiny_site("b", 40, 1)]
  for s in sites:
    sites_lib.write_site(s, tmp_path / "sites" / s.name)
  link, node_a, node_b = _free_ports(3)
  workdir = tmp_path / "run"
  procs, logs = [], {}

  def start(name, args, home):
    home.mkdir(parents=True, exist_ok=True)
    logs[name] = tmp_path / f"{name}.log"
    procs.append(subprocess.Popen(args, cwd=tmp_path, env=_env(home), start_new_session=True,
                                  stdout=logs[name].open("wb"), stderr=subprocess.STDOUT))

  try:
    start("superlink", [BIN / "flower-superlink", "--insecure", "--host", "127.0.0.1", "--port",
                        str(link), "--disable-runtime-dependency-installation"],
          tmp_path / "home_link")
    for (s, port) in zip(sites, (node_a, node_b)):
      start(f"supernode_{s.name}", [
          BIN / "flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{link}",
          "--port", str(port), "--max-wait-time", "120",
          "--node-config", f"site={_toml(s.name)} data-path={_toml(tmp_path / 'sites' / s.name)}"],
            tmp_path / f"home_{s.name}")
    _wait_for_port(link, procs[0])
    home = tmp_path / "home_cli"
    home.mkdir()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "test"\n\n[superlink.test]\naddress = "127.0.0.1:{link}"\n'
        "insecure = true\n")
    run_config = tmp_path / "run_config.toml"
    run_config.write_text(f"config = {_toml(SPEC)}\noverrides = {_toml(OVERRIDES)}\n"
                          f"workdir = {_toml(workdir)}\nsites = {_toml('a,b')}\n")
    start("flwr_run", [BIN / "flwr", "run", REPO / "flower", "test", "--stream",
                       "--run-config", run_config], home)
    deadline = time.time() + 420
    while procs[-1].poll() is None and time.time() < deadline:
      if any(p.poll() is not None for p in procs[:-1]):
        break  # The SuperLink or a SuperNode died.
      time.sleep(1)
    done = (workdir / "rounds.csv").is_file()
  finally:
    alive = _stop(procs)
  assert not alive, f"processes still running: {alive}"
  assert done, "\n".join(f"--- {k}\n{v.read_text()[-3000:]}" for k, v in logs.items())

  # By hand: each round's global model is FedAvg of the two sites' local
  # updates from the previous round's global model, weighted by their
  # training patients (the sites' own scalers, as each SuperNode fits them).
  config = federated_app.load_config(SPEC, OVERRIDES)
  like = federated.template_params(config)
  data = [federated.site_data(s, config) for s in sites]
  start_params = like
  for rnd in (1, 2):
    ups = [federated.local_update(config, d, start_params, round_=rnd)[0] for d in data]
    want = federated.fedavg(ups, [d.n_train for d in data])
    _, start_params, meta = federated.load_round(workdir, like, rnd)
    for a, b in zip(jax.tree.leaves(start_params), jax.tree.leaves(want)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert [h["round"] for h in meta["history"]] == [1, 2]
  assert [s["site"] for s in meta["sites"]] == ["a", "b"]
  assert meta["sites"][0]["n_train"] == data[0].n_train
  h = meta["history"][-1]
  assert h["a/n_train"] == data[0].n_train and h["b/n_train"] == data[1].n_train
  assert h["bytes_up"] == 2 * sum(x.nbytes for x in federated.flatten(like))
  assert (workdir / "rounds.png").is_file() and (workdir / "run.json").is_file()


def test_run_config_errors_name_the_key():
  from jaxsurv.errors import UserError
  config, workdir, names = federated_app.run_settings(
      {"config": SPEC, "overrides": "federated.rounds=3", "workdir": "w", "sites": "a, b"})
  assert config.federated.rounds == 3 and names == ["a", "b"] and workdir.is_absolute()
  with pytest.raises(UserError, match=r"lacks \['sites'\]"):
    federated_app.run_settings({"config": SPEC, "overrides": "", "workdir": "w"})
  with pytest.raises(UserError, match="expected configs/<file>.py"):
    federated_app.load_config("tests/conftest.py")
  with pytest.raises(UserError, match="'overrides' = 'federated.nope=1'"):
    federated_app.load_config(SPEC, "federated.nope=1")
  with pytest.raises(UserError, match="the Flower app trains sarcnet"):
    federated_app.load_config("configs/mmnn.py:local")
  with pytest.raises(UserError, match="distinct"):
    federated_app.run_settings({"config": SPEC, "overrides": "", "workdir": "w", "sites": "a,a"})


def test_sites_command_writes_each_site_folder_once(tmp_path, capsys):
  out = tmp_path / "sites"
  assert federated_app.main(["--config=configs/sarcnet.py:local", f"--out={out}"]) == 0
  rot = sites_lib.read_site(out / "rotterdam")
  assert rot.n == 2982 and (out / "gbsg" / sites_lib.TABLE_FILE).is_file()
  assert "sites=rotterdam,gbsg" in capsys.readouterr().out
  # A second time: refused, nothing overwritten.
  assert federated_app.main(["--config=configs/sarcnet.py:local", f"--out={out}"]) == 2
  assert "never overwritten" in capsys.readouterr().err
