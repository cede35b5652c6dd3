"""Federated training on Flower through the shared trainer (FedAvg, FedProx).

One Flower app, run either in Flower's simulation engine (``simulate``, what
``launch.py --config=configs/sarcnet.py`` does) or as a real deployment (a
SuperLink plus one SuperNode per site; README "SarcNet"):

* **ClientApp** (one per site; ``client_app``): reads only its own site's
  folder (``jaxsurv.data.sites``: the ``data-path`` of the SuperNode's
  ``--node-config``, or in simulation the folder of its partition), fits its
  scalers on its own training part (site-local standardisation: nothing
  about the patients leaves the site, not even feature means), and every
  round starts a fresh optimiser from the global parameters and runs
  ``config.federated.local_epochs`` epochs of the shared trainer's jitted
  step (``jaxsurv.trainer.Trainer.train_epoch``) on its training patients.
  It replies with the parameters, its number of training patients
  (``num-examples``, FedAvg's weight) and aggregate metrics (training loss;
  on its validation part Harrell's C and the 5-year cumulative/dynamic AUC).
  Only parameters and these aggregates leave a site.
* **ServerApp** (``server_app``): FedAvg (McMahan et al., AISTATS 2017) weighted
  by the sites' training patients, or FedProx (Li et al., MLSys 2020;
  ``config.federated.strategy="fedprox"``, the clients add the proximal
  term ``mu/2 ||w - w_global||^2`` via ``jaxsurv.trainer.optim``), for
  ``config.federated.rounds`` rounds. After every round the global model is
  checkpointed (Orbax, atomically) with the per-round, per-site validation
  metrics; a killed run started again resumes after the last completed
  round, and the clients' data order and dropout keys depend on the global
  round number only, so a resumed run ends as an uninterrupted one.

The objective: under the Cox loss each client's risk sets are its own
patients (within its batch), so FedAvg of local steps optimises a
**site-stratified** partial likelihood (each site its own baseline hazard),
not the pooled Cox likelihood (Andreux et al., "Federated survival analysis
with discrete-time Cox models", arXiv:2006.08997). The discrete-time NLL
(``config.loss.name="nll"``) decomposes over patients, so over sites too.

Metrics do not decompose: a weighted mean of per-site C-indices is not the
pooled C-index, so the per-round curves are per site, and the final pooled
evaluation (``jaxsurv.sarcnet``) is computed where the test predictions are
(the simulation's driver).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import pathlib
import time
from typing import Any, Mapping, Sequence

import jax
import ml_collections
import numpy as np

from jaxsurv import metrics, tasks
from jaxsurv.data import multimodal, sites as sites_lib
from jaxsurv.errors import UserError
from jaxsurv.models import registry
from jaxsurv.models.sarcnet import SarcNet
from jaxsurv.trainer import loop, optim

log = logging.getLogger("jaxsurv")

STRATEGIES = ("fedavg", "fedprox")
HORIZON_DAYS = 5 * 365.25
ROUNDS_DIR = "rounds"


# ----------------------------------------------------------------------------
# Model, task and trainer of one config.
# ----------------------------------------------------------------------------


def modalities(config) -> tuple[tuple[str, str], ...]:
  """``(name, kind)`` of the model: ``clinical`` plus ``wsi`` when configured."""
  mods = (("clinical", "tabular"),)
  return mods + ((sites_lib.BAG, "bag"),) if config.data.get("wsi_dim") else mods


def build_model(config) -> SarcNet:
  """``SarcNet`` with ``config.model``'s fields (``name`` aside).

  Raises:
    UserError: a field SarcNet does not have.
  """
  kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in config.model.items()
        if k != "name"}
  fields = {f.name for f in dataclasses.fields(SarcNet)} - {"parent", "name"}
  unknown = sorted(set(kw) - fields)
  if unknown:
    raise UserError(f"config.model has fields unknown to SarcNet: {unknown}")
  return SarcNet(modalities=modalities(config), n_out=1,
                 binary_head=bool(config.loss.get("horizon_weight", 0.0)), **kw)


def build_task(config) -> tasks.SingleOutcome:
  lc = config.loss
  return tasks.SingleOutcome(lc.name, alpha=float(lc.get("alpha", 0.0)), ties=lc.get(
      "ties", "breslow"), outcome="mfs", horizon_weight=float(lc.get("horizon_weight", 0.0)),
      horizon_days=HORIZON_DAYS)


def trainer_config(config, *, federated: bool) -> ml_collections.ConfigDict:
  """The shared trainer's config: FedProx's ``proximal_mu`` only for a client."""
  c = ml_collections.ConfigDict(config.to_dict())
  mu = config.federated.get("proximal_mu", 0.0) if config.federated.strategy == "fedprox" else 0
  c.optimizer.proximal_mu = float(mu) if federated else 0.0
  # The centralised comparators train as long as the federated model.
  c.num_epochs = int(config.federated.rounds) * int(config.federated.local_epochs)
  return c


@functools.lru_cache(maxsize=8)
def _trainer(config_json: str, federated: bool) -> loop.Trainer:
  config = ml_collections.ConfigDict(__import__("json").loads(config_json))
  return loop.Trainer(trainer_config(config, federated=federated), build_model(config),
                      registry.get("sarcnet").adapter, build_task(config))


def trainer(config, *, federated: bool) -> loop.Trainer:
  """The compiled ``Trainer`` of ``config`` (cached per config in a process)."""
  import json  # pylint: disable=import-outside-toplevel
  return _trainer(json.dumps(config.to_dict(), sort_keys=True), federated)


def check_config(config) -> None:
  """Raises ``UserError`` for bad federated settings (before any work)."""
  f = config.federated
  if f.strategy not in STRATEGIES:
    raise UserError(f"config.federated.strategy must be one of {STRATEGIES}, got "
                    f"{f.strategy!r}")
  for k in ("rounds", "local_epochs"):
    if int(f[k]) < 1:
      raise UserError(f"config.federated.{k} must be >= 1, got {f[k]}")
  if f.strategy == "fedprox" and not float(f.get("proximal_mu", 0.0)) > 0:
    raise UserError("config.federated.proximal_mu must be > 0 with the fedprox strategy")
  if config.optimizer.get("schedule") != "constant":
    raise UserError("federated training uses a constant learning rate "
                    "(config.optimizer.schedule='constant')")


# ----------------------------------------------------------------------------
# A site's data.
# ----------------------------------------------------------------------------


@dataclasses.dataclass
class SiteData:
  """A site's model-ready parts, fitted on its own training part.

  Attributes:
    site: the ``Site``.
    cohort: its ``MultimodalCohort``.
    transform: the ``FoldTransform`` fitted on its training part.
    parts: ``{"train", "val", "test": loop.Part}``.
  """
  site: sites_lib.Site
  cohort: multimodal.MultimodalCohort
  transform: multimodal.FoldTransform
  parts: dict

  @property
  def n_train(self) -> int:
    return len(self.parts["train"])


def site_data(site: sites_lib.Site, config, transform=None) -> SiteData:
  """Checks one site against the config and builds its parts.

  Args:
    site: the site.
    config: the run config (``data.columns``, ``data.log1p``,
      ``data.wsi_dim``).
    transform: a ``FoldTransform`` to apply instead of fitting one on the
      site's training part (a model trained elsewhere, evaluated here).

  Raises:
    UserError: as ``sites.check_sites``; a training part smaller than one batch.
  """
  d = config.data
  bag_dim = d.get("wsi_dim") or None
  sites_lib.check_sites([site], tuple(d.columns), bag_dim=bag_dim)
  cohort = sites_lib.to_cohort(site, tuple(d.columns), tuple(d.log1p), with_bags=bool(bag_dim))
  idx = {p: site.part(p) for p in sites_lib.PARTS}
  if transform is None:
    try:
      transform = multimodal.FoldTransform.fit(cohort, idx["train"], n_bins=d.n_bins,
                                               fold=site.name)
    except ValueError as e:
      raise UserError(f"site {site.name!r}: {e}") from e
  parts = {p: loop.Part(transform.transform(cohort, i)) for p, i in idx.items()}
  if len(parts["train"]) < config.batch_size:
    raise UserError(f"site {site.name!r}: its training part has {len(parts['train'])} patients, "
                    f"fewer than config.batch_size={config.batch_size}")
  return SiteData(site, cohort, transform, parts)


def pooled_data(data: Sequence[SiteData], config) -> SiteData:
  """All sites' patients as one cohort (the centralised comparator), scalers
  fitted on the pooled training part."""
  import pandas as pd  # pylint: disable=import-outside-toplevel
  table = pd.concat([s.site.table for s in data], ignore_index=True)
  bags = None
  if all(s.site.bags is not None for s in data):
    t = max(s.site.bags[0].shape[1] for s in data)
    pad = lambda a, fill: np.concatenate(  # noqa: E731
        [a, np.full((a.shape[0], t - a.shape[1], *a.shape[2:]), fill, a.dtype)], axis=1)
    bags = (np.concatenate([pad(s.site.bags[0], 0.0) for s in data]),
            np.concatenate([pad(s.site.bags[1], False) for s in data]))
  return site_data(sites_lib.Site("pooled", table, bags), config)


# ----------------------------------------------------------------------------
# Parameters on the wire.
# ----------------------------------------------------------------------------


def flatten(params) -> list[np.ndarray]:
  """The parameter pytree as a list of arrays (``jax.tree.leaves`` order)."""
  return [np.asarray(a) for a in jax.tree.leaves(params)]


def unflatten(arrays: Sequence[np.ndarray], like) -> Any:
  """Rebuilds the pytree of ``like`` from ``flatten``'s list.

  Raises:
    UserError: another number of arrays or another shape (a client or
      checkpoint of another model).
  """
  leaves, treedef = jax.tree.flatten(like)
  if len(arrays) != len(leaves):
    raise UserError(f"received {len(arrays)} parameter arrays, the model has {len(leaves)}")
  for i, (a, b) in enumerate(zip(arrays, leaves)):
    if tuple(np.shape(a)) != tuple(np.shape(b)):
      raise UserError(f"parameter array {i} has shape {np.shape(a)}, the model's is "
                      f"{np.shape(b)} (another model or config)")
  return jax.tree.unflatten(treedef, [np.asarray(a, np.float32) for a in arrays])


def template_params(config) -> Any:
  """Fresh parameters from ``config.seed``, from the config's input shapes
  alone (the server has no patient data)."""
  t = trainer(config, federated=False)
  n = config.batch_size
  inputs = {"clinical": np.zeros((n, len(config.data.columns)), np.float32)}
  presence = {"clinical": np.ones(n, bool)}
  if config.data.get("wsi_dim"):
    inputs[sites_lib.BAG] = np.zeros((n, 2, config.data.wsi_dim), np.float32)
    inputs[sites_lib.BAG + multimodal.TILE_MASK_SUFFIX] = np.ones((n, 2), bool)
    presence[sites_lib.BAG] = np.ones(n, bool)
  part = loop.Part({"inputs": inputs, "presence": presence,
                    "duration": np.ones(n, np.float32), "event": np.ones(n, np.int32),
                    "bin_index": np.zeros(n, np.int32)})
  state = t.init_state(jax.random.key(config.seed), part)
  return jax.tree.map(np.asarray, state.params)


# ----------------------------------------------------------------------------
# Client side: local training and evaluation.
# ----------------------------------------------------------------------------


def local_update(config, data: SiteData, params, *, round_: int) -> tuple[Any, dict]:
  """A site's local epochs from the global ``params`` in global round ``round_``.

  A fresh optimiser state (FedAvg's default; the proximal anchor of FedProx
  is the global model), a constant learning rate, and a data order and
  dropout key from ``(config.seed, round_, epoch)``, so the update depends
  only on the global model, the round and the site's data.

  Returns:
    ``(params, {"train_loss": mean data loss of the last local epoch})``.
  """
  t = trainer(config, federated=True)
  state = t.state_from(jax.tree.map(np.asarray, params), {})
  schedule = optim.lr_schedule(t.config, t.steps_per_epoch(data.n_train))
  e_local = int(config.federated.local_epochs)
  means = {}
  for e in range(e_local):
    epoch = (round_ - 1) * e_local + e
    rng = jax.random.fold_in(jax.random.key(config.seed), round_)
    state, means, _ = t.train_epoch(state, data.parts["train"], seed=config.seed, epoch=epoch,
                                    rng=rng, schedule=schedule, task_args=np.zeros(1))
  return jax.tree.map(np.asarray, state.params), {"train_loss": float(means["data_loss"])}


def risk_scores(config, params, part: loop.Part, *, federated: bool = False) -> np.ndarray:
  """Risk scores ``[n]`` (log-hazard; higher = earlier event) of a part."""
  t = trainer(config, federated=federated)
  out = t.predict_part(params, {}, part)
  return t.task.risk(out)[:, 0]


def site_metrics(config, data: SiteData, params, part: str = "val") -> dict:
  """Harrell's C and the 5-year cumulative/dynamic AUC of a site's part
  (NaN where undefined, e.g. no event before 5 years)."""
  p = data.parts[part]
  risk = risk_scores(config, params, p)
  d, e = np.asarray(p["duration"], np.float64), np.asarray(p["event"], np.int64)
  tr = data.parts["train"]
  res = {"cindex": float("nan"), "auc5": float("nan")}
  try:
    res["cindex"] = float(metrics.concordance_index(d, e, risk))
  except ValueError:
    pass
  try:
    auc, _ = metrics.cumulative_dynamic_auc(np.asarray(tr["duration"], np.float64),
                                            np.asarray(tr["event"], np.int64), d, e, risk,
                                            [HORIZON_DAYS])
    res["auc5"] = float(np.ravel(auc)[0])
  except ValueError:
    pass
  return res


# ----------------------------------------------------------------------------
# Flower apps.
# ----------------------------------------------------------------------------

_SITE_CACHE: dict = {}


def _client_site(config, folder: str, name: str) -> SiteData:
  key = (folder, name, config.to_json())
  if key not in _SITE_CACHE:
    _SITE_CACHE[key] = site_data(sites_lib.read_site(pathlib.Path(folder), name), config)
  return _SITE_CACHE[key]


def _node_site(context, site_dirs: Sequence[tuple[str, str]] | None) -> tuple[str, str]:
  """The (name, folder) of the node's site: ``--node-config "site=NAME
  data-path=FOLDER"`` in a deployment, the partition's folder in simulation."""
  nc = dict(context.node_config)
  if "data-path" in nc:
    return str(nc.get("site") or pathlib.Path(str(nc["data-path"])).name), str(nc["data-path"])
  if site_dirs is None or "partition-id" not in nc:
    raise UserError("this SuperNode has no site: start it with --node-config "
                    "\"site=NAME data-path=FOLDER\"")
  return site_dirs[int(nc["partition-id"])]


def config_hash(config) -> str:
  """A short ``runs.fingerprint`` of the whole config (the server refuses a
  site whose SuperNode runs another config or jaxsurv version)."""
  from jaxsurv import runs  # pylint: disable=import-outside-toplevel
  return runs.fingerprint(runs.config_to_dict(config))[:16]


def client_app(config, site_dirs: Sequence[tuple[str, str]] | None = None):
  """The Flower ``ClientApp`` of ``config`` (module docstring).

  Handles three message types: ``query`` (the check before round 1: the
  site's folder is read and checked against the config, and the reply gives
  its name, config hash and patient counts), ``train`` and ``evaluate``.
  Every reply carries a ``ConfigRecord`` ``"site"`` with the site's name.

  Args:
    config: the run config, or a function of the run's ``context.run_config``
      returning it (a deployment: ``jaxsurv.federated_app``).
    site_dirs: ``[(name, folder)]`` by partition id (simulation), or None
      (deployment: the node config names the folder).
  """
  from flwr.app import (  # pylint: disable=import-outside-toplevel
      ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict)
  from flwr.clientapp import ClientApp  # pylint: disable=import-outside-toplevel

  app = ClientApp()

  def _setup(context):
    cfg = config(context.run_config) if callable(config) else config
    name, folder = _node_site(context, site_dirs)
    return cfg, name, folder

  @app.query()
  def query(msg: Message, context) -> Message:
    cfg, name, folder = _setup(context)
    data = _client_site(cfg, folder, name)  # Checks the site (UserError naming it).
    tr = data.parts["train"]
    rec = MetricRecord({"n_train": data.n_train, "events_train": int(np.sum(tr["event"])),
                        "n_val": len(data.parts["val"]), "n_test": len(data.parts["test"])})
    return Message(RecordDict({"metrics": rec, "site": ConfigRecord(
        {"name": name, "config-hash": config_hash(cfg)})}), reply_to=msg)

  @app.train()
  def train(msg: Message, context) -> Message:
    cfg, name, folder = _setup(context)
    data = _client_site(cfg, folder, name)
    rc = msg.content["config"]
    round_ = int(rc["server-round"]) + int(rc.get("round-offset", 0))
    like = template_params(cfg)
    params = unflatten(msg.content["arrays"].to_numpy_ndarrays(), like)
    t0 = time.time()
    new, meas = local_update(cfg, data, params, round_=round_)
    metrics_ = MetricRecord({"num-examples": data.n_train, "train_loss": meas["train_loss"],
                             "seconds": time.time() - t0})
    return Message(RecordDict({"arrays": ArrayRecord(flatten(new)), "metrics": metrics_,
                               "site": ConfigRecord({"name": name})}), reply_to=msg)

  @app.evaluate()
  def evaluate(msg: Message, context) -> Message:
    cfg, name, folder = _setup(context)
    data = _client_site(cfg, folder, name)
    params = unflatten(msg.content["arrays"].to_numpy_ndarrays(), template_params(cfg))
    m = site_metrics(cfg, data, params, "val")
    rec = MetricRecord({"num-examples": len(data.parts["val"]),
                        "val_cindex": m["cindex"], "val_auc5": m["auc5"]})
    return Message(RecordDict({"metrics": rec, "site": ConfigRecord({"name": name})}),
                   reply_to=msg)

  return app


def _reason(reason: str) -> str:
  """A ClientApp's error text without Flower's ``<class '...'>:<'...'>`` wrapping."""
  import re  # pylint: disable=import-outside-toplevel
  m = re.fullmatch(r"<class '([\w.]+)'>:<'(.*)'>", reason, flags=re.S)
  if m is None:
    return reason
  return m.group(2) if m.group(1).endswith("UserError") else f"{m.group(1)}: {m.group(2)}"


def _site_name(content) -> str:
  return str(content.config_records["site"]["name"])


def preflight(grid, config, site_names: Sequence[str], *, timeout: float) -> list[dict]:
  """The check before round 1: waits for one SuperNode per site and asks each
  to read and check its site (``query``).

  Returns:
    Per site (in ``site_names`` order): name, training patients and events,
    validation and test patients.

  Raises:
    UserError: a site's check failed (its message names the site), a site
      is missing, reported twice or unknown, runs another config, or the
      SuperNodes did not connect within ``timeout`` seconds.
  """
  from flwr.app import ConfigRecord, Message, MessageType, RecordDict  # pylint: disable=C0415
  names = list(site_names)
  t0 = time.time()
  nodes = list(grid.get_node_ids())
  while len(nodes) < len(names):
    if time.time() - t0 > timeout:
      raise UserError(f"{len(nodes)} of {len(names)} SuperNodes (sites {names}) connected "
                      f"within {timeout:.0f} s")
    time.sleep(1.0)
    nodes = list(grid.get_node_ids())
  want = config_hash(config)
  msgs = [Message(RecordDict({"config": ConfigRecord({"config-hash": want})}), dst_node_id=n,
                  message_type=MessageType.QUERY) for n in nodes]
  replies = list(grid.send_and_receive(msgs, timeout=timeout))
  errors = [_reason(m.error.reason) for m in replies if m.has_error()]
  if errors:
    raise UserError("a site failed its check before round 1: " + "; ".join(errors))
  if len(replies) < len(nodes):
    raise UserError(f"only {len(replies)} of {len(nodes)} SuperNodes answered the check "
                    f"before round 1 within {timeout:.0f} s")
  got: dict[str, dict] = {}
  for m in replies:
    name = _site_name(m.content)
    if name in got:
      raise UserError(f"two SuperNodes report site {name!r} (each site runs one SuperNode)")
    if name not in names:
      raise UserError(f"a SuperNode reports site {name!r}, not one of the run's sites {names}")
    if str(m.content.config_records["site"]["config-hash"]) != want:
      raise UserError(f"site {name!r} runs another config (or jaxsurv version) than the "
                      "server: start its SuperNode from the same jaxsurv checkout")
    rec = next(iter(m.content.metric_records.values()))
    got[name] = {"site": name, **{k: int(v) for k, v in rec.items()}}
  missing = [n for n in names if n not in got]
  if missing:
    raise UserError(f"no SuperNode reports sites {missing}")
  return [got[n] for n in names]


def _per_site(records, keys: Sequence[str], n_key: str) -> dict:
  """Per-site metrics of a round's replies: ``{f"{site}/{key}": value}``, the
  reply's ``num-examples`` as ``f"{site}/{n_key}"``."""
  out = {}
  for rd in records:
    m = next(iter(rd.metric_records.values()))
    site = _site_name(rd)
    for k in keys:
      out[f"{site}/{k}"] = float(m[k])
    out[f"{site}/{n_key}"] = float(m["num-examples"])
  return out


def round_manager(workdir: pathlib.Path, create: bool = True):
  """Orbax manager of the global model per round (latest two kept)."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  return ocp.CheckpointManager(
      (pathlib.Path(workdir) / ROUNDS_DIR).absolute(),
      options=ocp.CheckpointManagerOptions(max_to_keep=2, create=create,
                                           enable_async_checkpointing=False),
      item_handlers={"params": ocp.StandardCheckpointHandler(),
                     "meta": ocp.JsonCheckpointHandler()})


def load_round(workdir: pathlib.Path, like, round_: int | None = None):
  """``(round, params, meta)`` of the last (or given) completed round, or None."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  if not (pathlib.Path(workdir) / ROUNDS_DIR).is_dir():
    return None
  mngr = round_manager(workdir, create=False)
  try:
    r = mngr.latest_step() if round_ is None else round_
    if r is None:
      return None
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), np.float32), like)
    try:
      got = mngr.restore(r, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract),
                                                     meta=ocp.args.JsonRestore()))
    except (ValueError, KeyError, OSError, RuntimeError) as e:
      raise UserError(f"cannot restore round {r} in {mngr.directory}: {type(e).__name__} "
                      "(written by another config? use a new --workdir)") from e
    return r, jax.tree.map(np.asarray, got["params"]), got["meta"]
  finally:
    mngr.close()


def run_server(grid, config, workdir: str | os.PathLike, site_names: Sequence[str], *,
               on_checked=None) -> list[dict]:
  """The ServerApp's main: the check before round 1 (``preflight``), then
  the strategy's rounds over ``grid``, checkpointed.

  Writes ``workdir/rounds/<r>`` (Orbax: the global parameters and a JSON
  record of every round so far: per-site training loss, local seconds and
  training patients, validation C-index and 5-year AUC unless
  ``config.federated.evaluate`` is False, the payload bytes sent each way)
  after each round; resumes after the last one found, and
  returns at once when every round is done.

  Args:
    on_checked: called after the check before round 1 and before anything
      is written (e.g. ``runs.open_run`` of the workdir).

  Returns:
    The per-round records (as in each checkpoint's ``meta["history"]``).

  Raises:
    UserError: as ``preflight``; a site's reply is an error (its message
      names the site); a resumed run whose sites' patient counts changed.
  """
  from flwr.app import ArrayRecord, ConfigRecord, MetricRecord  # pylint: disable=C0415
  from flwr.serverapp import strategy as fl_strategy  # pylint: disable=import-outside-toplevel
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel

  workdir = pathlib.Path(workdir)
  names = list(site_names)
  f = config.federated
  like = template_params(config)
  done = load_round(workdir, like)
  offset, params, history = 0, like, []
  if done is not None:
    offset, params, meta = done
    history = meta["history"]
    log.info("federated: resuming after round %d of %d", offset, f.rounds)
  if offset >= f.rounds:
    if on_checked is not None:
      on_checked()  # A finished run: nothing to train, but still the same config.
    return history
  timeout = float(f.get("timeout_s", 3600))
  site_info = preflight(grid, config, names, timeout=timeout)
  for row in site_info:
    log.info("site %s", row)
  if done is not None and done[2].get("sites") not in (None, site_info):
    raise UserError(f"the sites' data changed since round {offset} (then {done[2]['sites']}, "
                    f"now {site_info}): resume with the same data, or use a new workdir")
  if on_checked is not None:
    on_checked()
  base = fl_strategy.FedProx if f.strategy == "fedprox" else fl_strategy.FedAvg
  sent = int(sum(a.nbytes for a in flatten(params)))

  class Strategy(base):  # pylint: disable=missing-class-docstring
    round_record: dict = {}

    def _check(self, replies, what, server_round):
      errors = [_reason(m.error.reason) for m in replies if m.has_error()]
      if errors:
        raise UserError(f"a site failed to {what} in round {server_round + offset}: "
                        + "; ".join(errors))

    def aggregate_train(self, server_round, replies):
      replies = list(replies)
      self._check(replies, "train", server_round)
      self.round_record = {
          "round": server_round + offset, "bytes_down": sent * len(replies),
          "bytes_up": int(sum(sum(np.asarray(a).nbytes for a in
                                  m.content["arrays"].to_numpy_ndarrays()) for m in replies)),
          **_per_site([m.content for m in replies], ("train_loss", "seconds"), "n_train")}
      return super().aggregate_train(server_round, replies)

    def aggregate_evaluate(self, server_round, replies):
      replies = list(replies)
      self._check(replies, "evaluate", server_round)
      self.round_record.update(_per_site([m.content for m in replies],
                                         ("val_cindex", "val_auc5"), "n_val"))
      return super().aggregate_evaluate(server_round, replies)

  kw = dict(fraction_train=1.0, fraction_evaluate=1.0 if f.get("evaluate", True) else 0.0,
            min_train_nodes=len(names),
            min_evaluate_nodes=len(names), min_available_nodes=len(names))
  if f.strategy == "fedprox":
    kw["proximal_mu"] = float(f.proximal_mu)
  strategy = Strategy(**kw)
  mngr = round_manager(workdir)

  def checkpoint(server_round: int, arrays) -> MetricRecord | None:
    if server_round == 0:
      return None
    rec = dict(strategy.round_record, wall_time=time.time())
    history.append(rec)
    p = unflatten(arrays.to_numpy_ndarrays(), like)
    r = server_round + offset
    mngr.save(r, args=ocp.args.Composite(params=ocp.args.StandardSave(p),
                                         meta=ocp.args.JsonSave({"round": r, "history": history,
                                                                 "sites": site_info})))
    mngr.wait_until_finished()
    log.info("federated round %d/%d: %s", r, f.rounds,
             {k: round(v, 4) for k, v in rec.items() if "val_cindex" in k})
    return MetricRecord({"round": r})

  try:
    strategy.start(grid=grid, initial_arrays=ArrayRecord(flatten(params)),
                   num_rounds=int(f.rounds) - offset,
                   train_config=ConfigRecord({"round-offset": offset}),
                   evaluate_fn=checkpoint, timeout=timeout)
  finally:
    mngr.close()
  return history


def server_app(config, workdir: str | os.PathLike, site_names: Sequence[str]):
  """The Flower ``ServerApp`` of ``config``: ``run_server`` over its grid."""
  from flwr.serverapp import ServerApp  # pylint: disable=import-outside-toplevel
  app = ServerApp()

  @app.main()
  def main(grid, context) -> None:
    del context
    run_server(grid, config, workdir, site_names)

  return app


def simulate(config, workdir: pathlib.Path, site_dirs: Sequence[tuple[str, str]]) -> float:
  """Runs the federated experiment in Flower's simulation engine (Ray).

  One virtual SuperNode per site (``num_cpus=1`` each); the ServerApp runs in
  this process and checkpoints into ``workdir``. Returns the wall time (s).

  Raises:
    UserError: a site failed (the message names it).
  """
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  root = str(pathlib.Path(__file__).resolve().parents[1])
  os.environ["PYTHONPATH"] = os.pathsep.join(
      [root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
  from flwr.simulation import run_simulation  # pylint: disable=import-outside-toplevel
  # Flower logs every round's configuration at INFO; jaxsurv logs one line per round.
  logging.getLogger("flwr").setLevel(logging.WARNING)
  t0 = time.time()
  names = [n for n, _ in site_dirs]
  run_simulation(server_app(config, workdir, names), client_app(config, site_dirs),
                 num_supernodes=len(site_dirs),
                 backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                 "init_args": {"num_cpus": max(1, min(len(site_dirs),
                                                                      os.cpu_count() or 1)),
                                               "include_dashboard": False,
                                               "log_to_driver": False}})
  return time.time() - t0


def fedavg(params_list: Sequence[Any], weights: Sequence[float]) -> Any:
  """FedAvg by hand: the mean of parameter pytrees weighted by ``weights``
  (the sites' training patients), in float64 (for tests and checks)."""
  w = np.asarray(weights, np.float64)
  w = w / w.sum()
  return jax.tree.map(lambda *xs: sum(wi * np.asarray(x, np.float64) for wi, x in zip(w, xs)),
                      *params_list)


def history_rows(history: Sequence[Mapping]) -> list[dict]:
  """The per-round records as flat rows (for ``rounds.csv``)."""
  return [dict(h) for h in history]
