"""One process of a multi-process test run (spawned by tests/test_distributed.py).

  python tests/multiprocess_worker.py KIND N_PROCESSES PROCESS_ID PORT OUT_DIR [EPOCHS [BATCH]]

KIND is ``fusion`` (the concatenation model of the fusion zoo under the Cox
loss, on a synthetic tabular cohort) or ``mmnn`` (a tiny MMNN: 3D DenseNet +
clinical MLP, Cox heads with blend weights, on synthetic 8^3 volumes). Both
train through the shared trainer (``loop.Trainer.fit``) with plain SGD and no
dropout, in global batches of BATCH (default 12) split over the processes,
for EPOCHS (default 2) epochs, with an Orbax
checkpoint folder ``OUT_DIR/ckpt`` shared by the processes (so a second call
resumes). With N_PROCESSES > 1 the process connects through
``jaxsurv.distributed.initialize`` to 127.0.0.1:PORT first (timeout 20 s).

Each process writes ``OUT_DIR/process<ID>.npz`` (no pickles): the first
global batch's loss and gradient (from one SGD step of learning rate 1 on
fresh parameters: ``grad = params_0 - params_1``), the loss of the first
half of that batch alone (the objective one of two processes would see if
the loss were per process), the trained parameters, the per-epoch losses
and the validation outputs, flattened. Exit status 0 on success.
"""

import os
import pathlib
import sys

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _fusion(n: int):
  import ml_collections
  from configs import fusion as fusion_configs
  from jaxsurv import fusion_train as ft
  from jaxsurv.data import multimodal as mm
  from jaxsurv.trainer import loop
  rng = np.random.default_rng(0)
  ids = np.array([f"p{i:03d}" for i in range(n)])
  clin = rng.normal(size=(n, 3)).astype(np.float32)
  omic = rng.normal(size=(n, 5)).astype(np.float32)
  duration = rng.exponential(1000 * np.exp(-0.8 * clin[:, 0])) + 1
  event = (rng.random(n) < 0.6).astype(int)
  cohort = mm.MultimodalCohort(ids, {"clinical": clin, "omic": omic}, {},
                               {"clinical": np.ones(n, bool), "omic": np.ones(n, bool)},
                               duration, event)
  c = fusion_configs.base_config("concat", "clinical+rna", loss="cox", local=True)
  c.data.modalities = ("clinical", "omic")
  c.model = ml_collections.ConfigDict(dict(name="concat", embed_dim=4, snn_hidden=(4,),
                                           hidden=(4,), snn_dropout=0.0))
  c.train.modality_dropout = 0.0
  c.train.input_noise = 0.0
  trainer = ft.FusionTrainer(_train_config(c), ft.model_modalities(cohort)).trainer
  idx = np.arange(n)
  transform = mm.FoldTransform.fit(cohort, idx[:32], n_bins=c.data.n_bins)
  train = loop.Part(transform.transform(cohort, idx[:32]))
  val = loop.Part(transform.transform(cohort, idx[32:]))
  return trainer, train, val, None


def _mmnn(n: int):
  import ml_collections
  from configs import mmnn as mmnn_configs
  from jaxsurv import train as train_lib
  from jaxsurv.trainer import loop
  c = mmnn_configs.get_config("local")
  c.model.image.update(dict(init_features=4, growth_rate=2, block_config=(1,), bn_size=2,
                            dropout_rate=0.0, head_dropout_rate=0.0))
  c.model.clinical.update(hidden_sizes=(8,), dropout_rate=0.0)
  c.augment = ml_collections.ConfigDict(dict(enabled=False))
  trainer = train_lib.make_trainer(_train_config(c))
  rng = np.random.default_rng(0)
  arrays = {"inputs": {"image": rng.normal(size=(n, 8, 8, 8, 2)).astype(np.float32),
                       "clinical": rng.normal(size=(n, 3)).astype(np.float32)},
            "presence": {},
            "duration": rng.integers(1, 400, size=(n, 2)).astype(np.float32),
            "event": (rng.random((n, 2)) < 0.6).astype(np.int32),
            "outcome_mask": np.ones((n, 2), bool)}
  part = loop.Part(arrays)
  blend = loop.ConstantArgs(np.array([0.5, 0.3, 0.2], np.float32))
  return trainer, part.subset(np.arange(32)), part.subset(np.arange(32, n)), blend


BATCH = [12]


def _train_config(c):
  import ml_collections
  c.batch_size = BATCH[0]
  c.eval_batch_size = BATCH[0]
  c.optimizer.update(name="sgd", momentum=0.0, weight_decay=0.0, schedule="constant", lr=0.05)
  c.grad_accum_steps = 1
  c.selection = "last"
  c.early_stopping = ml_collections.ConfigDict(dict(patience=0, min_epochs=0, min_delta=0.0))
  c.progress_bar = False
  c.log_every_steps = 0
  c.loss.l1 = 0.0
  return c


def main(argv):
  kind, n_proc, pid, port, out = argv[1], int(argv[2]), int(argv[3]), int(argv[4]), argv[5]
  epochs = int(argv[6]) if len(argv) > 6 else 2
  BATCH[0] = b = int(argv[7]) if len(argv) > 7 else 12
  import jax
  jax.config.update("jax_platforms", "cpu")
  jax.config.update("jax_num_cpu_devices", 1)
  # The test suite's persistent compilation cache (tests/conftest.py).
  cache = pathlib.Path(os.environ.get("JAXSURV_CACHE", "~/.cache/jaxsurv")).expanduser()
  jax.config.update("jax_compilation_cache_dir", str(cache / "jax_compilation_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
  from jaxsurv import distributed
  if n_proc > 1:
    timeout = int(os.environ.get("WORKER_TIMEOUT", "20"))
    distributed.initialize("on", f"127.0.0.1:{port}", n_proc, pid, timeout=timeout,
                           heartbeat_timeout=timeout)
  assert jax.process_count() == n_proc and jax.device_count() == n_proc
  import jax.numpy as jnp
  out = pathlib.Path(out)
  trainer, train, val, controller = (_fusion if kind == "fusion" else _mmnn)(48)
  trainer.config.num_epochs = epochs

  # Loss and gradient of the first global batch: one SGD step of lr 1.
  state = trainer.init_state(jax.random.key(0), train)
  p0 = distributed.to_host(state.params)
  args = jnp.asarray(controller.args() if controller else np.zeros(1), jnp.float32)
  state, meas = trainer.train_step(state, trainer.batch(train, np.arange(b), b),
                                   jax.random.key(1), jnp.float32(1.0), args)
  p1 = distributed.to_host(state.params)
  grad = [x - y for x, y in zip(jax.tree.leaves(p0), jax.tree.leaves(p1))]
  # The first half alone (the rest masked): a per-process Cox risk set.
  _, half = trainer.train_step(trainer.init_state(jax.random.key(0), train),
                               trainer.batch(train, np.arange(b // 2), b),
                               jax.random.key(1), jnp.float32(1.0), args)

  res = trainer.fit(train, val, seed=0, controller=controller, checkpoint_dir=out / "ckpt")
  val_out = trainer.predict_part(res.params, res.batch_stats, val)
  np.savez(out / f"process{pid}.npz",
           loss=np.float64(meas["loss"]), half_loss=np.float64(half["loss"]),
           grad=np.concatenate([g.ravel() for g in grad]),
           params=np.concatenate([np.ravel(a) for a in jax.tree.leaves(res.params)]),
           val_out=np.concatenate([np.ravel(a) for a in jax.tree.leaves(val_out)]),
           train_loss=np.array([h["train_loss"] for h in res.history]),
           val_loss=np.array([h["val_loss"] for h in res.history]),
           resumed_from=np.int64(-1 if res.resumed_from is None else res.resumed_from),
           process_count=np.int64(jax.process_count()))
  print(f"WORKER_OK {pid}", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
