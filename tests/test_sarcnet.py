"""SarcNet: the model, the horizon head, FedProx, site checks and federated rounds.

The federated rounds run in process: a small ``Grid`` hands each message to
the real ``ClientApp`` (as Flower's runtime does, without Ray or a network);
the aggregate is checked against FedAvg computed by hand from the same
local updates, and a run killed in round 2 resumes to the same parameters.
The real deployment (SuperLink + SuperNodes) is in test_federated_deploy.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import sarcnet as sarcnet_config
from jaxsurv import federated, tasks
from jaxsurv.data import sites as sites_lib
from jaxsurv.errors import UserError
from jaxsurv.losses import cox_ph_loss
from jaxsurv.models.sarcnet import Chowder, SarcNet
from jaxsurv.trainer import optim

from conftest import tiny_site as _site


def test_chowder_takes_top_and_bottom_k_of_valid_tiles():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(3, 6, 4)).astype(np.float32)
  mask = np.array([[1, 1, 1, 1, 1, 0], [1, 1, 0, 0, 0, 0], [0] * 6], bool)
  m = Chowder(k=3, hidden=(), fc_dim=0)
  v = m.init(jax.random.key(0), x, mask, train=False)
  v = {"params": {"score": {"kernel": jnp.ones((4, 1)), "bias": jnp.zeros(1)}}}
  z, s = m.apply(v, x, mask, train=False)
  score = x.sum(-1)
  # Patient 0: five valid tiles (the padded one never counts).
  srt = np.sort(score[0, :5])
  np.testing.assert_allclose(z[0], np.r_[srt[::-1][:3], srt[:3]], rtol=1e-6)
  # Patient 1: two valid tiles; the empty slots repeat the last valid extreme.
  hi, lo = max(score[1, :2]), min(score[1, :2])
  np.testing.assert_allclose(z[1], [hi, lo, lo, lo, hi, hi], rtol=1e-6)
  np.testing.assert_array_equal(z[2], np.zeros(6))  # No valid tile.
  np.testing.assert_array_equal(np.asarray(s)[~mask], 0.0)


def test_chowder_gives_2k_extremes_whatever_the_tile_slots():
  # Regression: with fewer slots than k the width (and the MLP's kernel)
  # followed the batch's padding, so the server's template (2 slots) did not
  # fit a site's bags.
  rng = np.random.default_rng(2)
  m = Chowder(k=5, hidden=(8,), fc_dim=0)
  x2, x9 = rng.normal(size=(2, 2, 4)), rng.normal(size=(2, 9, 4))
  v2 = m.init(jax.random.key(0), x2, np.ones((2, 2), bool), train=False)
  v9 = m.init(jax.random.key(0), x9, np.ones((2, 9), bool), train=False)
  assert jax.tree.map(np.shape, v2) == jax.tree.map(np.shape, v9)
  assert v2["params"]["mlp_0"]["kernel"].shape == (10, 8)
  # Two valid tiles in 2 slots or in 9 (7 masked): the same embedding.
  pad = np.concatenate([x2, rng.normal(size=(2, 7, 4))], 1)
  mask = np.zeros((2, 9), bool)
  mask[:, :2] = True
  z2, _ = m.apply(v2, x2, np.ones((2, 2), bool), train=False)
  z9, _ = m.apply(v2, pad, mask, train=False)
  np.testing.assert_allclose(z2, z9, rtol=1e-6)


@pytest.mark.parametrize("mil", ["attention", "chowder"])
def test_sarcnet_ignores_the_tiles_of_a_patient_without_a_slide(mil):
  rng = np.random.default_rng(1)
  model = SarcNet(mil=mil, binary_head=True)
  inputs = {"clinical": rng.normal(size=(2, 5)).astype(np.float32),
            "wsi": rng.normal(size=(2, 7, 8)).astype(np.float32),
            "wsi_tile_mask": np.ones((2, 7), bool)}
  presence = {"clinical": np.ones(2, bool), "wsi": np.array([True, False])}
  v = model.init(jax.random.key(0), inputs, presence, train=False)
  out, _ = model.apply(v, inputs, presence, train=False)
  assert out.shape == (2, 2)
  changed = dict(inputs, wsi=inputs["wsi"] * 0 + 100.0)
  out2, _ = model.apply(v, changed, presence, train=False)
  np.testing.assert_allclose(out2[1], out[1], rtol=1e-6)  # Absent slide: no effect.
  assert not np.allclose(out2[0], out[0])


def test_horizon_head_adds_the_binary_cross_entropy_of_known_patients():
  duration = np.array([100., 2000., 900., 3000., 1500., 400.], np.float32)
  event = np.array([1, 1, 0, 0, 1, 0], np.int32)
  out = np.array([[.1, -.3], [.5, .2], [-.2, .4], [.3, -1.], [0., .7], [.2, .1]], np.float32)
  batch = {"duration": duration, "event": event, "mask": np.ones(6, bool),
           "bin_index": np.zeros(6, np.int32)}
  task = tasks.SingleOutcome("cox", horizon_weight=0.5, horizon_days=1826.25)
  got, _ = task.loss({"out": jnp.asarray(out)}, batch, jnp.zeros(1))
  # By hand: cases = events by day 1826.25 (rows 0, 4); controls = followed
  # beyond it (rows 1, 3: the event at day 2000 is after the horizon);
  # rows 2 and 5 are censored before it (unknown).
  known, label = np.array([0, 1, 3, 4]), np.array([1., 0., 0., 1.])
  p = 1 / (1 + np.exp(-out[known, 1].astype(np.float64)))
  bce = -np.mean(label * np.log(p) + (1 - label) * np.log(1 - p))
  cox = float(cox_ph_loss(jnp.asarray(out[:, 0]), duration, event))
  np.testing.assert_allclose(float(got), cox + 0.5 * bce, rtol=1e-5)


def test_fedprox_term_pulls_towards_the_initial_parameters():
  w0 = {"a": jnp.array([1.0, -2.0])}
  tx = optim.add_proximal_term(0.1)
  state = tx.init(w0)
  w = {"a": jnp.array([3.0, 0.0])}
  g = {"a": jnp.array([0.5, 0.5])}
  upd, _ = tx.update(g, state, w)
  np.testing.assert_allclose(upd["a"], [0.5 + 0.1 * 2.0, 0.5 + 0.1 * 2.0])


def test_site_checks_name_the_site():
  cols = ("age", "size_band", "grade")
  with pytest.raises(UserError, match="site 'b': no event in its training part"):
    sites_lib.check_sites([_site("a", 40, 0), _site("b", 40, 1, events=False)], cols,
                          bag_dim=None)
  with pytest.raises(UserError, match=r"site 'b': missing columns \['grade'\]"):
    sites_lib.check_sites([_site("a", 40, 0), _site("b", 40, 1, drop="grade")], cols,
                          bag_dim=None)
  with pytest.raises(UserError, match="site 'b' has 6, the config and the other sites have 8"):
    sites_lib.check_sites([_site("a", 40, 0, dim=8), _site("b", 40, 1, dim=6)], cols, bag_dim=8)


def test_tcga_regions_follow_the_tissue_source_site():
  assert sites_lib.tcga_region("TCGA-BH-A0B3") == "Northeast"
  assert sites_lib.tcga_region("TCGA-D8-A1X5") == "Europe"
  assert sites_lib.tcga_region("TCGA-PL-A8LV") is None  # Nigeria: "Other".
  with pytest.raises(UserError, match="not a TCGA barcode"):
    sites_lib.tcga_region("rotterdam-1")


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch):
  """The run identity Flower's runtime sets in a ServerApp process."""
  from flwr.supercore.task_identity import TaskIdentity
  for k, v in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
    monkeypatch.setattr(TaskIdentity, k, v)


class _Grid:
  """The in-process runtime: each message goes to the ClientApp of its node."""

  def __init__(self, app, n_nodes, fail_in_round=None):
    from flwr.app import RecordDict
    self.app, self.n, self.fail = app, n_nodes, fail_in_round
    self.state = RecordDict()

  def get_node_ids(self):
    return list(range(1, self.n + 1))

  def send_and_receive(self, messages, *, timeout=None):
    from flwr.app import Context
    replies = []
    for m in messages:
      cfg = m.content.get("config")
      if self.fail and cfg is not None and cfg.get("server-round") == self.fail:
        raise KeyboardInterrupt("killed")
      ctx = Context(run_id=1, node_id=m.metadata.dst_node_id,
                    node_config={"partition-id": m.metadata.dst_node_id - 1,
                                 "num-partitions": self.n}, state=self.state, run_config={})
      replies.append(self.app(m, ctx))
    return replies


def _config():
  c = sarcnet_config.get_config("local")
  c.data.columns = ("age", "size_band", "grade")
  c.data.log1p = ()
  c.federated.rounds = 2
  c.federated.local_epochs = 1
  c.batch_size = 16
  c.eval_batch_size = 32
  return c


def test_federated_rounds_are_fedavg_of_the_local_updates_and_resume(tmp_path):
  config = _config()
  sites = [_site("a", 72, 0), _site("b", 40, 1)]
  site_dirs = []
  for s in sites:
    sites_lib.write_site(s, tmp_path / "sites" / s.name)
    site_dirs.append((s.name, str(tmp_path / "sites" / s.name)))
  names = [s.name for s in sites]
  app = federated.client_app(config, site_dirs)

  federated.run_server(_Grid(app, 2), config, tmp_path / "run", names)
  like = federated.template_params(config)
  r, got, meta = federated.load_round(tmp_path / "run", like)
  assert r == 2 and [h["round"] for h in meta["history"]] == [1, 2]

  # By hand: each round's global model is FedAvg of the sites' local updates
  # from the previous global model, weighted by their training patients.
  # (Each round starts from the server's float32 model: Adam's first step is
  # about lr * sign(gradient), so a 1e-8 difference in the start can move a
  # parameter with a near-zero gradient by 2 lr.)
  data = [federated.site_data(s, config) for s in sites]
  start = like
  for rnd in (1, 2):
    ups = [federated.local_update(config, d, start, round_=rnd)[0] for d in data]
    want = federated.fedavg(ups, [d.n_train for d in data])
    _, start, _ = federated.load_round(tmp_path / "run", like, rnd)
    for a, b in zip(jax.tree.leaves(start), jax.tree.leaves(want)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  h = meta["history"][-1]
  assert h["a/n_train"] == data[0].n_train and h["b/n_train"] == data[1].n_train
  assert h["bytes_up"] == 2 * sum(x.nbytes for x in federated.flatten(like))
  assert 0 <= h["a/val_cindex"] <= 1

  # Killed during round 2, then started again: resumes after round 1.
  with pytest.raises(KeyboardInterrupt):
    federated.run_server(_Grid(app, 2, fail_in_round=2), config, tmp_path / "killed", names)
  assert federated.load_round(tmp_path / "killed", like)[0] == 1
  federated.run_server(_Grid(app, 2), config, tmp_path / "killed", names)
  r2, resumed, meta2 = federated.load_round(tmp_path / "killed", like)
  assert r2 == 2 and [h["round"] for h in meta2["history"]] == [1, 2]
  for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(got)):
    np.testing.assert_array_equal(a, b)


def test_a_failing_site_stops_the_run_with_its_name(tmp_path):
  config = _config()
  good = _site("a", 72, 0)
  sites_lib.write_site(good, tmp_path / "a")
  bad = _site("b", 40, 1, drop="grade")
  sites_lib.write_site(bad, tmp_path / "b")
  app = federated.client_app(config, [("a", str(tmp_path / "a")), ("b", str(tmp_path / "b"))])
  with pytest.raises(UserError, match=r"site 'b': missing columns \['grade'\]"):
    federated.run_server(_Grid(app, 2), config, tmp_path / "run", ["a", "b"])
  assert federated.load_round(tmp_path / "run", federated.template_params(config)) is None


def test_rotterdam_gbsg_sites_are_the_packaged_cohorts_with_recurrence_free_survival():
  from jaxsurv.data import public
  rot, gbsg = sites_lib.rotterdam_gbsg(seed=0)
  raw = public.load_cohort_table("rotterdam")
  # R survival's "validate" vignette: rfs = max(recur, death), time = rtime
  # if recurred else dtime.
  want_event = np.maximum(raw["dm_event"], raw["os_event"]).to_numpy()
  want_time = np.where(raw["dm_event"] == 1, raw["dm_time"], raw["os_time"])
  assert rot.n == 2982 and gbsg.n == 686
  np.testing.assert_array_equal(rot.table["event"], want_event)
  np.testing.assert_array_equal(rot.table["duration"], want_time)
  assert int(gbsg.table["event"].sum()) == 299
  np.testing.assert_array_equal(gbsg.table["size_band"].to_numpy()[:5],
                                [["<=20", "20-50", ">50"].index(str(v)) for v in
                                 public.load_cohort_table("gbsg")["size"][:5]])
  for s in (rot, gbsg):
    counts = s.table["split"].value_counts()
    assert abs(counts["test"] - round(0.15 * s.n)) <= 1 and set(counts.index) == set(sites_lib.PARTS)
  sites_lib.check_sites([rot, gbsg], sites_lib.ROTTERDAM_GBSG_NUMERIC, bag_dim=None)


def test_the_experiment_refuses_bad_sites_before_writing(tmp_path):
  from jaxsurv import sarcnet
  config = _config()
  sites_lib.write_site(_site("a", 72, 0), tmp_path / "a")
  sites_lib.write_site(_site("b", 40, 1, drop="grade"), tmp_path / "b")
  config.data.cohort = "folders"
  config.data.site_dirs = f"a={tmp_path / 'a'},b={tmp_path / 'b'}"
  with pytest.raises(UserError, match=r"site 'b': missing columns \['grade'\]"):
    sarcnet.train_and_evaluate(config, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()
  config.data.site_dirs = f"a={tmp_path / 'a'},b={tmp_path / 'nowhere'}"
  with pytest.raises(UserError, match="site 'b': .*clinical.csv does not exist"):
    sarcnet.train_and_evaluate(config, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


def test_paired_bootstrap_scores_match_their_references():
  from sklearn.metrics import roc_auc_score
  from jaxsurv import metrics, sarcnet
  rng = np.random.default_rng(3)
  n = 120
  d = rng.exponential(1500, n)
  e = (rng.uniform(size=n) < 0.7).astype(int)
  r = -np.log(d) + rng.normal(size=n)
  g = rng.integers(1, 4, n).astype(float)
  res = sarcnet.score_models({"m": r, "g": g}, d, e, d, e, n_boot=50, seed=0, reference="g")
  known = (e.astype(bool) & (d <= 1826.25)) | (d > 1826.25)
  case = e.astype(bool) & (d <= 1826.25)
  assert res["m"]["auc5_binary"]["estimate"] == pytest.approx(roc_auc_score(case[known],
                                                                            r[known]))
  auc, _ = metrics.cumulative_dynamic_auc(d, e, d, e, r, [1826.25])
  assert res["m"]["auc5_cd"]["estimate"] == pytest.approx(float(auc[0]))
  assert res["m"]["cindex"]["estimate"] == pytest.approx(metrics.concordance_index(d, e, r))
  m = res["m"]["auc5_binary"]
  assert m["ci_low"] <= m["estimate"] <= m["ci_high"] and 0 <= m["p_vs_g"] <= 1
  assert np.isnan(res["g"]["auc5_binary"]["p_vs_g"])
