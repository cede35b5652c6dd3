"""Train step, augmentation and the end-to-end MMNN job on a tiny demo cohort."""

import functools
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest

from jaxsurv import augment
from conftest import REPO, subprocess_pythonpath, subprocess_xla_flags, tiny_mmnn_config


def test_augment_identity_and_flip_are_exact():
  # Jitted as in the train step (one compile each, not op by op).
  apply_affine, augment_batch = jax.jit(augment.apply_affine), jax.jit(augment.augment_batch)
  vol = jax.random.normal(jax.random.key(0), (6, 7, 8, 2))
  np.testing.assert_allclose(apply_affine(vol, jnp.eye(3)), vol, atol=1e-5)
  flipped = apply_affine(vol, jnp.diag(jnp.array([1.0, -1.0, 1.0])))
  np.testing.assert_allclose(flipped, vol[:, ::-1], atol=1e-5)
  out = augment_batch(jax.random.key(1), jnp.stack([vol, vol]))
  assert out.shape == (2, 6, 7, 8, 2)
  # Both channels get the same spatial map: channel difference maps alike.
  same = jnp.stack([vol[..., 0], vol[..., 0]], -1)
  out2 = augment_batch(jax.random.key(1), same[None])
  np.testing.assert_allclose(out2[..., 0], out2[..., 1], atol=1e-6)
  # Every channel at once equals jax.scipy's map_coordinates channel by channel
  # (order 1, edge values outside), bit for bit, for a random rotation + zoom.
  from jax.scipy import ndimage  # pylint: disable=import-outside-toplevel
  mat = augment.random_affine(jax.random.key(3), max_rotation_deg=30.0, zoom_range=(0.8, 1.2))

  @jax.jit
  def per_channel(vol, mat):
    centre = (jnp.asarray(vol.shape[:3], jnp.float32) - 1.0) / 2.0
    grid = jnp.stack(jnp.meshgrid(*[jnp.arange(n, dtype=jnp.float32) for n in vol.shape[:3]],
                                  indexing="ij"), 0).reshape(3, -1)
    coords = mat @ (grid - centre[:, None]) + centre[:, None]
    return jnp.stack([ndimage.map_coordinates(vol[..., c], list(coords), order=1,
                                              mode="nearest").reshape(vol.shape[:3])
                      for c in range(vol.shape[-1])], -1)
  np.testing.assert_array_equal(apply_affine(vol, mat), per_channel(vol, mat))


_STEP_SCRIPT = textwrap.dedent("""
    import functools, jax, jax.numpy as jnp, numpy as np, optax
    from jax.sharding import NamedSharding, PartitionSpec as P
    from jaxsurv import tasks, train
    from jaxsurv.models import MMNN, registry
    from jaxsurv.trainer import step as step_lib
    assert jax.device_count() == 4
    model = MMNN(n_outcomes=2, image_kwargs=dict(init_features=4, growth_rate=2, block_config=(1,),
                                                 bn_size=2, dropout_rate=0.0, head_dropout_rate=0.0),
                 clinical_kwargs=dict(hidden_sizes=(8,), dropout_rate=0.0))
    tx = optax.identity()  # Plain SGD: params - lr * grad.
    rng = np.random.default_rng(0)
    b = 8
    batch = {"inputs": {"image": rng.normal(size=(b, 8, 8, 8, 2)).astype(np.float32),
                        "clinical": rng.normal(size=(b, 3)).astype(np.float32)},
             "presence": {},
             "duration": rng.integers(1, 6, size=(b, 2)).astype(np.float32),
             "event": (rng.random((b, 2)) < 0.6).astype(np.int32),
             "outcome_mask": np.ones((b, 2), bool), "mask": np.ones(b, bool)}
    v = model.init(jax.random.key(0), jnp.asarray(batch["inputs"]["image"][:1]),
                   jnp.asarray(batch["inputs"]["clinical"][:1]), train=False)
    v = jax.tree.map(np.array, v)  # Host copies: the donated state must not alias them.
    def fresh():
      return step_lib.TrainState(step=jnp.zeros((), jnp.int32), params=v["params"],
                                 batch_stats=v["batch_stats"], opt_state=tx.init(v["params"]))
    step = jax.jit(functools.partial(
        step_lib.train_step, model=model, call=registry.get("mmnn").adapter, tx=tx,
        task=tasks.CoxHeads(heads=("mm", "image", "clinical"), outcomes=("os", "dm")),
        augment=train.ImageAugment(0.5, 10.0, (0.9, 1.1)), l1=0.0, l1_include="all"),
        donate_argnums=(0,))
    w = jnp.array([0.5, 0.3, 0.2])
    key = jax.random.key(3)
    lr = jnp.float32(0.5)
    one = jax.devices()[0]
    s1, m1 = step(jax.device_put(fresh(), one), jax.device_put(batch, one), key, lr, w)
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    s4, m4 = step(jax.device_put(fresh(), NamedSharding(mesh, P())),
                  jax.device_put(batch, NamedSharding(mesh, P("data"))), key, lr, w)
    err = max(float(np.max(np.abs(np.asarray(a) - np.asarray(c))))
              for a, c in zip(jax.tree.leaves(s1), jax.tree.leaves(s4)))
    moved = max(float(np.max(np.abs(np.asarray(a) - np.asarray(c))))
                for a, c in zip(jax.tree.leaves(s1.params), jax.tree.leaves(v["params"])))
    assert abs(float(m1["loss"]) - float(m4["loss"])) < 1e-5, (m1["loss"], m4["loss"])
    assert moved > 1e-3, moved
    assert err < 1e-5, err
    # Changing the blend weights or the learning rate does not recompile.
    n_compiled = step._cache_size()
    step(s4, jax.device_put(batch, NamedSharding(mesh, P("data"))), key, jnp.float32(0.1),
         jnp.array([0.2, 0.2, 0.6]))
    assert step._cache_size() == n_compiled
    print("STEP_OK", err, moved)
    """)


def test_sharded_train_step_equals_single_device():
  """On 4 fake CPU devices the data-parallel step equals the single-device step (SGD)."""
  env = dict(os.environ,
             XLA_FLAGS=subprocess_xla_flags("--xla_force_host_platform_device_count=4"),
             JAX_PLATFORMS="cpu", PYTHONPATH=subprocess_pythonpath())
  proc = subprocess.run([sys.executable, "-c", _STEP_SCRIPT], env=env, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert "STEP_OK" in proc.stdout


# ----------------------------------------------------------------------------
# End to end on a tiny demo cohort.
# ----------------------------------------------------------------------------


@pytest.fixture
def cache(tmp_path, monkeypatch):
  monkeypatch.setenv("JAXSURV_CACHE", str(tmp_path / "cache"))
  return tmp_path


def test_end_to_end_run_and_resume(cache, monkeypatch):
  """A run killed after its first epoch resumes and ends exactly like an uninterrupted one."""
  from jaxsurv import train
  full = train.train_and_evaluate(tiny_mmnn_config(), str(cache / "full"))
  for name in ("results.json", "predictions.csv", "config.json", "splits.json",
               "preprocess.json", "training_curves.png", "blend_weights.png", "km_test_os.png"):
    assert (cache / "full" / name).exists(), name
  res = json.loads((cache / "full" / "results.json").read_text())
  for split in ("val", "test"):
    for o in ("os", "dm"):
      assert 0.0 <= res[split][o]["cindex"] <= 1.0
      assert set(res[split][o]["auc"]) == {"2y", "5y"}
      assert "oracle_cindex" in res[split][o]
  pred = pd.read_csv(cache / "full" / "predictions.csv")
  assert set(pred["split"]) == {"train", "val", "test"} and len(pred) == 32
  assert np.all((pred["p_os_5y"] >= pred["p_os_2y"] - 1e-12))  # Event prob. grows with time.

  from jaxsurv.trainer import loop
  real_order = loop.epoch_order
  def interrupted(seed, epoch, n):
    if epoch == 1:
      raise KeyboardInterrupt("simulated kill")
    return real_order(seed, epoch, n)
  monkeypatch.setattr(loop, "epoch_order", interrupted)
  # The resumed run uses a relative workdir, as in the README's command.
  monkeypatch.chdir(cache)
  with pytest.raises(KeyboardInterrupt):
    train.train_and_evaluate(tiny_mmnn_config(), "resumed")
  assert (cache / "resumed" / "checkpoints").exists()
  assert not (cache / "resumed" / "results.json").exists()
  monkeypatch.setattr(loop, "epoch_order", real_order)
  resumed = train.train_and_evaluate(tiny_mmnn_config(), "resumed")
  assert resumed["best_epoch"] == full["best_epoch"]
  for split in ("val", "test"):
    for o in ("os", "dm"):
      np.testing.assert_allclose(resumed[split][o]["cindex"], full[split][o]["cindex"], rtol=1e-6)
  pred2 = pd.read_csv(cache / "resumed" / "predictions.csv")
  np.testing.assert_allclose(pred2["risk_os"], pred["risk_os"], rtol=1e-5, atol=1e-6)


def test_bad_config_and_nan_loss(cache, monkeypatch):
  from jaxsurv import train
  with pytest.raises(ValueError, match=r"missing from cohort.*\['tumour_volume'\]"):
    train.train_and_evaluate(tiny_mmnn_config(**{"data.numeric": ("age", "tumour_volume")}),
                             str(cache / "bad"))
  from jaxsurv import tasks
  from jaxsurv.trainer import loop
  monkeypatch.setattr(tasks.CoxHeads, "head_losses",
                      lambda self, outputs, duration, event, mask:
                      {k: jnp.nan * jnp.sum(outputs[k]) for k in self.heads})
  loop._compiled.cache_clear()  # The step is traced again with the patched loss.
  with pytest.raises(train.TrainingError, match=r"non-finite training loss nan at step \d+"):
    train.train_and_evaluate(tiny_mmnn_config(), str(cache / "nan"))
  assert not (cache / "nan" / "results.json").exists()
  loop._compiled.cache_clear()
