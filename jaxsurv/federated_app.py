r"""SarcNet as a Flower app for a real deployment: a SuperLink and one SuperNode per site.

The app bundle is the folder ``flower/`` of this repository: its
``pyproject.toml`` names this module's ``serverapp`` and ``clientapp`` and
holds the run config's defaults. The commands (README "SarcNet"), each
machine with this repository as its working directory and on
``PYTHONPATH``:

  # Each site's folder (clinical.csv + tiles.safetensors, jaxsurv.data.sites)
  # from a packaged cohort; a hospital writes its own instead.
  python -m jaxsurv.federated_app --config=configs/sarcnet.py:local --out=runs/sites
  # The coordinator:
  flower-superlink --insecure --disable-runtime-dependency-installation
  # At each site (its own folder only):
  flower-supernode --insecure --superlink=COORDINATOR:8000 --port=9094 \
      --node-config="site=rotterdam data-path=runs/sites/rotterdam"
  # Start the run (the coordinator; a connection named in $FLWR_HOME/config.toml):
  flwr run flower jaxsurv --run-config="workdir='/abs/runs/deploy'"

Run config (``[tool.flwr.app.config]``, ``flwr run --run-config`` overrides):

* ``config``: the jaxsurv config, ``configs/<file>.py[:arg]`` of the jaxsurv
  checkout on each machine (the server and every site load it; the check
  before round 1 refuses a site whose config differs);
* ``overrides``: space-separated ``field=value`` overrides of it
  (``"federated.rounds=2 batch_size=32"``);
* ``workdir``: the server's run folder (absolute, or relative to the
  SuperLink's working directory). A folder of another config is refused
  (``jaxsurv.runs.open_run``); a finished run is not overwritten;
* ``sites``: the comma-separated site names; the server waits for one
  SuperNode per site and refuses a missing, doubled or unknown one.

Each SuperNode's ``--node-config`` gives ``site=NAME data-path=FOLDER``: the
ClientApp reads only that folder. Everything else is ``jaxsurv.federated``:
the same ClientApp, strategy, per-round checkpoints (resume by running the
same ``flwr run`` again) and per-site metrics as the simulation. The server
writes ``workdir/rounds/<r>``, ``rounds.csv`` and ``rounds.png``; the test
patients stay at their sites (the pooled test tables are the simulation's,
``launch.py --config=configs/sarcnet.py``).
"""

from __future__ import annotations

import functools
import logging
import os
import pathlib
import shlex
import sys

from absl import flags
from ml_collections import config_flags

from jaxsurv import cli, federated
from jaxsurv.data import sites as sites_lib
from jaxsurv.errors import UserError

log = logging.getLogger("jaxsurv")

REPO = pathlib.Path(__file__).resolve().parents[1]
RUN_CONFIG_KEYS = ("config", "overrides", "workdir", "sites")


def _process_setup() -> None:
  """In every app process (Flower starts a new ClientApp process per
  message): the persistent compilation cache, unless JAX's own environment
  variable already configures it; Flower's log lines once (not again through
  the root logger)."""
  if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    cli.setup_compilation_cache(True)
  logging.getLogger("flwr").propagate = False


@functools.lru_cache(maxsize=4)
def load_config(spec: str, overrides: str = ""):
  """The config of ``spec`` (``configs/<file>.py[:arg]``, resolved inside this
  checkout) with ``overrides`` (space-separated ``field=value``).

  Raises:
    UserError: a file outside ``configs/`` or missing, an unknown field or a
      value of the wrong type.
  """
  path, sep, arg = str(spec).partition(":")
  file = (REPO / path).resolve()
  if file.suffix != ".py" or (REPO / "configs") not in file.parents or not file.is_file():
    raise UserError(f"run config 'config' = {spec!r}: expected configs/<file>.py[:arg], a "
                    f"config file of the jaxsurv checkout {REPO}")
  fv = flags.FlagValues()
  argv = ["jaxsurv.federated_app", f"--config={file}{sep}{arg}"] + [
      f"--config.{o}" for o in shlex.split(str(overrides))]
  config_flags.DEFINE_config_file("config", None, "run config", flag_values=fv,
                                  lock_config=True, sys_argv=argv)
  try:
    fv(argv)
    config = fv["config"].value
    config.to_dict()  # A file that failed to load raises on first use.
  except (flags.Error, ValueError, TypeError, AttributeError, KeyError, OSError) as e:
    raise UserError(f"run config 'config' = {spec!r}, 'overrides' = {overrides!r}: {e}") from e
  if config.model.get("name") != "sarcnet":
    raise UserError(f"run config 'config' = {spec!r}: model {config.model.get('name')!r}, "
                    "the Flower app trains sarcnet")
  federated.check_config(config)
  return config


def run_settings(run_config) -> tuple:
  """``(config, workdir, site names)`` of a run config (module docstring).

  Raises:
    UserError: a key missing, no site, a site named twice.
  """
  rc = dict(run_config)
  missing = [k for k in RUN_CONFIG_KEYS if k not in rc]
  if missing:
    raise UserError(f"the run config lacks {missing} (flower/pyproject.toml)")
  config = load_config(str(rc["config"]), str(rc["overrides"]))
  names = [n.strip() for n in str(rc["sites"]).split(",") if n.strip()]
  if not names or len(set(names)) != len(names):
    raise UserError(f"run config 'sites' = {rc['sites']!r}: expected distinct comma-separated "
                    "site names")
  if not str(rc["workdir"]).strip():
    raise UserError("run config 'workdir' is empty")
  return config, pathlib.Path(str(rc["workdir"])).absolute(), names


def _client_config(run_config):
  _process_setup()
  return run_settings(run_config)[0]


def server_main(grid, context) -> list[dict]:
  """The deployment's ServerApp: checks the run config, then
  ``federated.run_server`` (the check of every site before round 1, then the
  workdir is created or refused by ``runs.open_run``, the rounds, a
  checkpoint per round), then ``rounds.csv`` and ``rounds.png``."""
  from jaxsurv import runs, sarcnet  # pylint: disable=import-outside-toplevel
  _process_setup()
  logging.getLogger("jaxsurv").setLevel(logging.INFO)
  config, workdir, names = run_settings(context.run_config)
  log.info("federated deployment: %d rounds x %d local epochs over sites %s (%s) into %s",
           config.federated.rounds, config.federated.local_epochs, names,
           config.federated.strategy, workdir)
  # The workdir is created (or a run of another config refused) only after
  # every site passed its check.
  history = federated.run_server(grid, config, workdir, names, on_checked=lambda: runs.open_run(
      workdir, runs.config_to_dict(config), "flower-deployment:" + ",".join(names)))
  sarcnet.write_rounds(history, workdir, names)
  return history


def _server_app():
  from flwr.serverapp import ServerApp  # pylint: disable=import-outside-toplevel
  app = ServerApp()

  @app.main()
  def main(grid, context) -> None:
    from flwr.common.logger import log as flwr_log  # pylint: disable=C0415
    try:
      server_main(grid, context)
    except UserError as e:
      # One clear line in the run's log (what `flwr run --stream` and `flwr
      # log` show); then Flower's own failure handling: the run ends failed
      # with this message as its details (`flwr ls`), after a short
      # traceback of its runtime's frames only.
      flwr_log(logging.ERROR, "jaxsurv: error: %s", e)
      raise UserError(str(e)) from None

  return app


serverapp = _server_app()
clientapp = federated.client_app(_client_config)


# ----------------------------------------------------------------------------
# python -m jaxsurv.federated_app: each site's folder from a packaged cohort.
# ----------------------------------------------------------------------------


def define_flags(fv: flags.FlagValues, argv) -> None:
  config_flags.DEFINE_config_file("config", None, "SarcNet config file[:arg]; --config.key=value "
                                  "overrides its fields", flag_values=fv, lock_config=True,
                                  sys_argv=list(argv))
  flags.DEFINE_string("out", None, "folder to write one sub-folder per site into (must not "
                      "exist or be empty)", flag_values=fv)
  flags.mark_flags_as_required(["config", "out"], flag_values=fv)


def _main(argv, fv: flags.FlagValues) -> int:
  del argv
  config = cli.config_value(fv["config"])
  sites = sites_lib.load_sites(config)
  sites_lib.check_sites(sites, tuple(config.data.columns),
                        bag_dim=config.data.get("wsi_dim") or None)
  out = pathlib.Path(fv["out"].value)
  if out.exists() and (not out.is_dir() or any(out.iterdir())):
    raise UserError(f"--out={out}: exists and is not an empty folder (sites are never "
                    "overwritten)")
  for s in sites:
    sites_lib.write_site(s, out / s.name)
    print(f"site {s.name}: {s.n} patients -> {out / s.name}")
  print("sites=" + ",".join(s.name for s in sites))
  return 0


def main(argv=None) -> int:
  """In-process entry point (``jaxsurv.cli.call``)."""
  return cli.call(_main, define_flags, sys.argv[1:] if argv is None else argv,
                  prog="python -m jaxsurv.federated_app")


if __name__ == "__main__":
  cli.run(_main, define_flags=define_flags)
