"""Fusion-zoo train-step benchmark: jaxsurv's HEALNet step vs a PyTorch HEALNet.

For each setting this measures the train step exactly as
``jaxsurv.fusion_train.FusionTrainer`` builds it (``build_model`` from the
config, ``make_optimizer``, ``train_step`` jitted with the state donated, the
batch padded to a fixed size and sharded over a ``("data",)`` mesh, L1 and
the bin-weighted discrete-time NLL), on synthetic inputs with TCGA-BRCA's
widths (clinical 20, RNA 200 features; standard normal values, 4 time bins,
~10% events):

* compile: ``train_step.lower(...)`` (trace + lower) and ``.compile()`` timed
  separately, with the persistent compilation cache off;
* step time: ``--warmup`` untimed then ``--steps`` timed steps, each ended
  by ``jax.block_until_ready``, cycling over 3 device-resident batches;
  samples/s = batch / median step time;
* memory: XLA's ``memory_analysis()`` of the compiled step (argument +
  output + temporary buffers, less the donated aliases: the step's device
  memory).

Models (``configs/healnet.py`` variants): ``healnet`` with the released
BRCA settings (depth 2, 17 latents x 126, one 63-wide cross-attention head
per modality, one token per tabular modality, dropouts 0.455 / 0.365, L1
6.8e-6); ``healnet:paper`` (weights shared between layers, 8 heads x 63,
every feature a token with its Fourier position and an 8-wide learned
embedding: 220 tokens on BRCA instead of 2); ``healnet:local`` (the released
network, trained as ``local``); and, as a simple reference, the
concatenation baseline (``configs/fusion.py:model=concat,local``).

The PyTorch reference (``TorchHEALNet`` below, written from the HEALNet
paper (Hemker et al. 2024, Algorithms 1-2) and the description of
konst-int-i/healnet's layers in ``jaxsurv/models/healnet.py``, not from the
peer's code) is the same
network -- per-modality pre-norm cross-attention with temperature 0.5 and
LeakyReLU output, SELU-gated feed-forward, one token per tabular modality
with its Fourier position features or one per feature with its learned
embedding, weights shared between layers or not, mean-pooled latents ->
LayerNorm -> linear head -- for the released and the paper settings, with
the same loss (NLL alpha 0.4 with inverse-frequency bin
weights, + L1 over all parameters) and Adam, run eagerly; parameter counts of
the two implementations are checked equal.

  python benchmarks/fusion_benchmark.py                  # all settings (~8 min, 2 cores)
  python benchmarks/fusion_benchmark.py --batch 4 --steps 50 --no-torch

Extras: PyTorch (``pip install -r benchmarks/requirements.txt``).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import sys
import time

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))
import common  # pylint: disable=wrong-import-position

WIDTHS = {"clinical": 20, "rna": 200}  # TCGA-BRCA feature counts.
N_BINS = 4


def _cpu_model() -> str:
  return common.cpu_model()


def synthetic_batch(seed: int, batch: int) -> dict:
  """Host arrays: ``inputs {m: [batch, f_m]}``, presence, bins, events, durations."""
  rng = np.random.default_rng(seed)
  event = (rng.random(batch) < 0.1).astype(np.int32)
  event[0] = 1
  return {
      "inputs": {m: rng.standard_normal((batch, f)).astype(np.float32)
                 for m, f in WIDTHS.items()},
      "presence": {m: np.ones(batch, bool) for m in WIDTHS},
      "bin_index": rng.integers(0, N_BINS, batch).astype(np.int32),
      "event": event,
      "duration": (1.0 + rng.exponential(1000.0, batch)).astype(np.float32),
  }


MODELS = ("healnet", "healnet:paper", "healnet:local", "concat")
TORCH_MODELS = ("healnet", "healnet:paper")


def _config(model: str, batch: int):
  if model.split(":")[0] == "healnet":
    from configs import healnet
    c = healnet.get_config(model.partition(":")[2] or None)
  else:
    from configs import fusion
    c = fusion.get_config(f"model={model},local")
  c.batch_size = batch
  c.eval_batch_size = batch
  return c


# ----------------------------------------------------------------------------
# jaxsurv.
# ----------------------------------------------------------------------------


def bench_jax(model: str, batch: int, warmup: int, steps: int) -> dict:
  import jax
  import jax.numpy as jnp
  from jaxsurv import fusion_train as ft
  from jaxsurv.models.fusion import count_params
  jax.config.update("jax_enable_compilation_cache", False)
  config = _config(model, batch)
  trainer = ft.FusionTrainer(config, tuple((m, "tabular") for m in WIDTHS))
  host = [synthetic_batch(s, batch) for s in range(3)]
  batches = [trainer.batch(h, np.arange(batch), batch) for h in host]
  state = trainer.init_state(jax.random.key(0), host[0])
  n_params = count_params(state.params)
  bw = jnp.asarray([1 / 100, 1 / 80, 1 / 60, 1 / 40], jnp.float32)
  rng, lr = jax.random.key(1), jnp.float32(1e-3)
  t0 = time.perf_counter()
  lowered = trainer.train_step.lower(state, batches[0], rng, lr, bw)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  mem = compiled.memory_analysis()
  step_bytes = None if mem is None else int(
      mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
      - mem.alias_size_in_bytes)
  times = []
  for i in range(warmup + steps):
    s0 = time.perf_counter()
    state, meas = compiled(state, batches[i % 3], rng, lr, bw)
    jax.block_until_ready((state, meas))
    if i >= warmup:
      times.append(time.perf_counter() - s0)
  if not np.isfinite(float(meas["loss"])):
    raise RuntimeError(f"non-finite loss in the {model} benchmark")
  med = statistics.median(times)
  return {"framework": "jaxsurv", "model": model, "batch": batch, "params": n_params,
          "lower_s": t1 - t0, "compile_s": t2 - t1, "step_ms_median": 1e3 * med,
          "step_ms_min": 1e3 * min(times), "step_ms_max": 1e3 * max(times),
          "samples_per_s": batch / med, "step_mib": None if step_bytes is None
          else step_bytes / 2**20, "device": jax.devices()[0].device_kind}


# ----------------------------------------------------------------------------
# PyTorch HEALNet reference.
# ----------------------------------------------------------------------------


def _torch_modules():
  import torch
  from torch import nn

  class Attention(nn.Module):
    def __init__(self, d, ctx, heads, dim_head, dropout, temperature=0.5):
      super().__init__()
      self.h, self.dh, self.t = heads, dim_head, temperature
      self.to_q = nn.Linear(d, heads * dim_head, bias=False)
      self.to_kv = nn.Linear(ctx, 2 * heads * dim_head, bias=False)
      self.to_out = nn.Linear(heads * dim_head, d)
      self.drop = nn.Dropout(dropout)

    def forward(self, x, ctx):
      b, l, _ = x.shape
      n = ctx.shape[1]
      q = self.to_q(x).view(b, l, self.h, self.dh)
      k, v = self.to_kv(ctx).view(b, n, 2 * self.h, self.dh).chunk(2, dim=2)
      sim = torch.einsum("blhd,bnhd->bhln", q, k) * (self.dh ** -0.5 / self.t)
      attn = self.drop(sim.softmax(-1))
      o = torch.einsum("bhln,bnhd->blhd", attn, v).reshape(b, l, self.h * self.dh)
      return nn.functional.leaky_relu(self.to_out(o), 0.01)

  class FeedForward(nn.Module):
    def __init__(self, d, mult, dropout):
      super().__init__()
      self.wi = nn.Linear(d, 2 * mult * d)
      self.wo = nn.Linear(mult * d, d)
      self.drop = nn.Dropout(dropout)

    def forward(self, x):
      a, g = self.wi(x).chunk(2, dim=-1)
      return self.drop(self.wo(a * nn.functional.selu(g)))

  class CrossBlock(nn.Module):
    def __init__(self, d, ctx, heads, dim_head, attn_dropout, ff_dropout):
      super().__init__()
      self.norm, self.norm_context, self.norm_ff = (nn.LayerNorm(d), nn.LayerNorm(ctx),
                                                    nn.LayerNorm(d))
      self.attn = Attention(d, ctx, heads, dim_head, attn_dropout)
      self.ff = FeedForward(d, 4, ff_dropout)

    def forward(self, x, ctx):
      x = x + self.attn(self.norm(x), self.norm_context(ctx))
      return x + self.ff(self.norm_ff(x))

  def fourier(pos, num_bands, max_freq):
    scales = torch.linspace(1.0, max_freq / 2.0, num_bands)
    a = torch.pi * pos[:, None] * scales
    return torch.cat([torch.sin(a), torch.cos(a), pos[:, None]], dim=-1)  # [n, 2B + 1]

  class TorchHEALNet(nn.Module):
    """HEALNet without latent self-attention: one token per tabular modality
    (``features=False``) or per feature with a learned embedding of width
    ``embed``; ``shared``: one weight set for every layer."""

    def __init__(self, widths, depth, num_latents, latent_dim, cross_heads, cross_dim_head,
                 attn_dropout, ff_dropout, num_freq_bands, max_freq, n_out, *,
                 features=False, embed=0, shared=False):
      super().__init__()
      self.names, self.depth, self.features = list(widths), depth, features
      enc = 2 * num_freq_bands + 1
      self.latents = nn.Parameter(torch.randn(num_latents, latent_dim))
      ctx = {m: (1 + enc + embed if features else f + enc) for m, f in widths.items()}
      self.layers = nn.ModuleList([
          nn.ModuleDict({m: CrossBlock(latent_dim, ctx[m], cross_heads, cross_dim_head,
                                       attn_dropout, ff_dropout) for m in widths})
          for _ in range(1 if shared else depth)])
      self.head_norm = nn.LayerNorm(latent_dim)
      self.head = nn.Linear(latent_dim, n_out)
      # Per-feature tokens: positions linspace(-1, 1, f); one token: x = -1.
      for m, f in widths.items():
        pos = torch.linspace(-1.0, 1.0, f) if features else torch.tensor([-1.0])
        self.register_buffer(f"pos_{m}", fourier(pos, num_freq_bands, max_freq))
      self.embed = nn.ParameterDict({m: nn.Parameter(torch.randn(f, embed))
                                     for m, f in widths.items()} if features and embed else {})

    def forward(self, inputs, presence):
      b = next(iter(inputs.values())).shape[0]
      x = self.latents.expand(b, -1, -1)
      tokens = {}
      for m in self.names:
        pos = getattr(self, f"pos_{m}")
        if self.features:
          extra = torch.cat([pos, self.embed[m]], -1) if m in self.embed else pos
          tokens[m] = torch.cat([inputs[m][:, :, None], extra.expand(b, -1, -1)], dim=-1)
        else:
          tokens[m] = torch.cat([inputs[m][:, None, :], pos.expand(b, 1, -1)], dim=-1)
      for i in range(self.depth):
        layer = self.layers[min(i, len(self.layers) - 1)]
        for m in self.names:
          y = layer[m](x, tokens[m])
          x = torch.where(presence[m][:, None, None], y, x)
      return self.head(self.head_norm(x.mean(1)))

  def nll(logits, y, event, alpha, bin_weights):
    log_h = -nn.functional.softplus(-logits)
    log_1mh = -nn.functional.softplus(logits)
    cum = log_1mh.cumsum(1)
    ls = cum.gather(1, y[:, None])[:, 0]
    lh = log_h.gather(1, y[:, None])[:, 0]
    l1mh = log_1mh.gather(1, y[:, None])[:, 0]
    e = event.float()
    unc = -e * (lh + ls - l1mh)
    cens = -(1 - e) * ls
    w = bin_weights[y] / bin_weights.sum()
    return ((1 - alpha) * w * (unc + cens) + alpha * unc).mean()

  return torch, TorchHEALNet, nll


def bench_torch(model_name: str, batch: int, warmup: int, steps: int) -> dict:
  torch, TorchHEALNet, nll = _torch_modules()
  torch.manual_seed(0)
  torch.set_num_threads(os.cpu_count() or 1)
  config = _config(model_name, batch)
  m = dict(config.model)
  if m.get("weight_sharing", "none") not in ("none", "all"):
    raise ValueError(f"the torch reference shares all weights or none, got {m['weight_sharing']}")
  model = TorchHEALNet(WIDTHS, m["depth"], m["num_latents"], m["latent_dim"], m["cross_heads"],
                       m["cross_dim_head"], m["attn_dropout"], m["ff_dropout"],
                       m["num_freq_bands"], m["max_freq"], N_BINS,
                       features=m.get("tabular_tokens", "vector") == "features",
                       embed=m.get("feature_embed_dim", 0),
                       shared=m.get("weight_sharing", "none") == "all")
  model.train()
  opt = torch.optim.Adam(model.parameters(), lr=1e-3)
  l1 = float(config.loss.l1)
  bw = torch.tensor([1 / 100, 1 / 80, 1 / 60, 1 / 40])
  batches = []
  for s in range(3):
    h = synthetic_batch(s, batch)
    batches.append(({k: torch.from_numpy(v) for k, v in h["inputs"].items()},
                    {k: torch.from_numpy(v) for k, v in h["presence"].items()},
                    torch.from_numpy(h["bin_index"]).long(), torch.from_numpy(h["event"])))
  times = []
  for i in range(warmup + steps):
    inputs, presence, y, e = batches[i % 3]
    s0 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    loss = nll(model(inputs, presence), y, e, float(config.loss.alpha), bw)
    loss = loss + l1 * sum(p.abs().sum() for p in model.parameters())
    loss.backward()
    opt.step()
    if i >= warmup:
      times.append(time.perf_counter() - s0)
  med = statistics.median(times)
  return {"framework": "torch", "model": model_name, "batch": batch,
          "params": sum(p.numel() for p in model.parameters()), "lower_s": None,
          "compile_s": None, "step_ms_median": 1e3 * med, "step_ms_min": 1e3 * min(times),
          "step_ms_max": 1e3 * max(times), "samples_per_s": batch / med, "step_mib": None,
          "device": f"cpu, torch {torch.__version__}, {torch.get_num_threads()} threads"}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--batch", type=int, nargs="+", default=[4, 32])
  parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
  parser.add_argument("--warmup", type=int, default=5)
  parser.add_argument("--steps", type=int, default=30)
  parser.add_argument("--no-torch", action="store_true")
  args = parser.parse_args(argv)
  rows = []
  for batch in args.batch:
    for model in args.models:
      rows.append(bench_jax(model, batch, args.warmup, args.steps))
      print("RESULT " + json.dumps(rows[-1]), flush=True)
    for model in () if args.no_torch else [m for m in args.models if m in TORCH_MODELS]:
      rows.append(bench_torch(model, batch, args.warmup, args.steps))
      print("RESULT " + json.dumps(rows[-1]), flush=True)
      jax_row = next(r for r in rows if r["framework"] == "jaxsurv" and r["model"] == model
                     and r["batch"] == batch)
      if jax_row["params"] != rows[-1]["params"]:
        raise RuntimeError(f"{model}: parameter counts differ: jaxsurv {jax_row['params']}, "
                           f"torch {rows[-1]['params']}")
      rows[-1]["jax_speedup"] = rows[-1]["step_ms_median"] / jax_row["step_ms_median"]
  print(f"\nMachine: {_cpu_model()}, {os.cpu_count()} cores, load average "
        f"{os.getloadavg()[0]:.1f}; Python {platform.python_version()}")
  print("| framework | model | batch | params | trace+lower s | compile s | step ms (median, "
        "min-max) | samples/s | step memory MiB | torch / jaxsurv step |")
  print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
  for r in rows:
    lower = "–" if r["lower_s"] is None else f"{r['lower_s']:.2f}"
    comp = "–" if r["compile_s"] is None else f"{r['compile_s']:.2f}"
    mib = "–" if r.get("step_mib") is None else f"{r['step_mib']:.1f}"
    ratio = f"{r['jax_speedup']:.2f}" if "jax_speedup" in r else "–"
    print(f"| {r['framework']} | {r['model']} | {r['batch']} | {r['params']} | {lower} | "
          f"{comp} | {r['step_ms_median']:.1f} ({r['step_ms_min']:.1f}-{r['step_ms_max']:.1f}) | "
          f"{r['samples_per_s']:.0f} | {mib} | {ratio} |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
