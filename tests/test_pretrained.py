"""Tests for jaxsurv.models.pretrained: PyTorch DenseNet state dicts into DenseNet3D.

Without torch (as in CI): hand-built safetensors files in MONAI naming, checked
element by element against the PyTorch -> Flax transposition written out here,
plus the errors and the partial report. With torch and MONAI: a random MONAI
DenseNet's eval-mode feature trunk is matched to 1e-5; with torch alone: a
y-Aware-style checkpoint (DataParallel names, wrapped, no norm5, 1 channel).
"""

import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from safetensors.numpy import save_file

from jaxsurv.errors import UserError
from jaxsurv.models import MMNN, DenseNet3D
from jaxsurv.models import pretrained

# A tiny DenseNet3D (stem 3^3) and, written out by hand, its MONAI state dict:
# init 4, growth 2, bn_size 2 (bottleneck 4), blocks (1, 1): 4 -> 6 -> 3 -> 5.
TINY = dict(init_features=4, growth_rate=2, block_config=(1, 1), bn_size=2, stem_kernel=3,
            dropout_rate=0.0, head_dropout_rate=0.0, features=3)
# (MONAI key below "features.", PyTorch shape, Flax collection, Flax path, Flax leaf shape).
_CONV = [("conv0.weight", (4, 2, 3, 3, 3), ("conv0", "kernel")),
         ("denseblock1.denselayer1.layers.conv1.weight", (4, 4, 1, 1, 1),
          ("block1_layer1", "conv1", "kernel")),
         ("denseblock1.denselayer1.layers.conv2.weight", (2, 4, 3, 3, 3),
          ("block1_layer1", "conv2", "kernel")),
         ("transition1.conv.weight", (3, 6, 1, 1, 1), ("transition1_conv", "kernel")),
         ("denseblock2.denselayer1.layers.conv1.weight", (4, 3, 1, 1, 1),
          ("block2_layer1", "conv1", "kernel")),
         ("denseblock2.denselayer1.layers.conv2.weight", (2, 4, 3, 3, 3),
          ("block2_layer1", "conv2", "kernel"))]
_NORM = [("norm0", 4, ("norm0",)),
         ("denseblock1.denselayer1.layers.norm1", 4, ("block1_layer1", "norm1")),
         ("denseblock1.denselayer1.layers.norm2", 4, ("block1_layer1", "norm2")),
         ("transition1.norm", 6, ("transition1_norm",)),
         ("denseblock2.denselayer1.layers.norm1", 3, ("block2_layer1", "norm1")),
         ("denseblock2.denselayer1.layers.norm2", 4, ("block2_layer1", "norm2")),
         ("norm5", 5, ("norm5",))]
_BN = [("weight", "params", "scale"), ("bias", "params", "bias"),
       ("running_mean", "batch_stats", "mean"), ("running_var", "batch_stats", "var")]

_fast_jit = functools.partial(jax.jit, compiler_options={
    "xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True})


def monai_state(seed=0, in_channels=2):
  """Distinct random values under MONAI's key names, head and counters included."""
  rng = np.random.default_rng(seed)
  sd = {}
  for key, shape, _ in _CONV:
    shape = (shape[0], in_channels) + shape[2:] if key == "conv0.weight" else shape
    sd["features." + key] = rng.normal(size=shape).astype(np.float32)
  for key, n, _ in _NORM:
    for suffix, _, _ in _BN:
      v = rng.normal(size=n).astype(np.float32)
      sd[f"features.{key}.{suffix}"] = np.abs(v) + 0.5 if suffix == "running_var" else v
    sd[f"features.{key}.num_batches_tracked"] = np.array(7, np.int64)
  sd["class_layers.out.weight"] = rng.normal(size=(3, 5)).astype(np.float32)
  sd["class_layers.out.bias"] = rng.normal(size=3).astype(np.float32)
  return sd


@functools.partial(_fast_jit, static_argnums=(0,))
def _init(model, x):
  return model.init(jax.random.key(0), x, train=False)


@functools.partial(_fast_jit, static_argnums=(0,))
def _apply(model, variables, x):
  return model.apply(variables, x, train=False)


def tiny_variables(in_channels=2, **kw):
  model = DenseNet3D(**{**TINY, **kw})
  return model, jax.device_get(_init(model, jnp.zeros((1, 8, 8, 8, in_channels))))


def check_elementwise(variables, sd, prefix=(), key_prefix="features.", stats=True):
  """Every mapped array equals the checkpoint's, index by index (no transpose call)."""
  params = traverse_util.flatten_dict(variables["params"])
  for key, _, path in _CONV:
    w, k = sd[key_prefix + key], np.asarray(params[prefix + path])
    assert k.shape == w.shape[2:] + (w.shape[1], w.shape[0]), key
    for o, i, d, h, x in np.ndindex(*w.shape):
      assert k[d, h, x, i, o] == w[o, i, d, h, x], (key, (o, i, d, h, x))
  for key, _, path in _NORM:
    for suffix, coll, leaf in _BN:
      if coll == "batch_stats" and not stats:
        continue
      got = traverse_util.flatten_dict(variables[coll])[prefix + path + ("bn", leaf)]
      np.testing.assert_array_equal(got, sd[f"{key_prefix}{key}.{suffix}"], err_msg=key)


# ----------------------------------------------------------------------------
# Without torch.
# ----------------------------------------------------------------------------


def test_safetensors_monai_names_elementwise(tmp_path):
  sd = monai_state()
  path = tmp_path / "monai.safetensors"
  save_file(sd, str(path))
  model, init = tiny_variables()
  new, report = pretrained.load_densenet(init, path)
  # Conv kernels: [out, in, kd, kh, kw] -> [kd, kh, kw, in, out], element by element.
  check_elementwise(new, sd)
  # The head is not loaded: it keeps its initial values.
  np.testing.assert_array_equal(new["params"]["head"]["kernel"], init["params"]["head"]["kernel"])
  assert sorted(report.head) == ["class_layers.out.bias", "class_layers.out.weight"]
  assert len(report.loaded) == len(_CONV) + 4 * len(_NORM) and not report.missing
  assert not report.unused and report.scope == ()
  # The loaded variables run (eval mode) and differ from the fresh ones.
  x = jnp.asarray(np.random.default_rng(1).normal(size=(1, 8, 8, 8, 2)), jnp.float32)
  _, aux_new = _apply(model, new, x)
  _, aux_old = _apply(model, init, x)
  assert np.all(np.isfinite(aux_new["pooled"]))
  assert not np.allclose(aux_new["pooled"], aux_old["pooled"])


def test_mmnn_image_encoder_dataparallel_torchvision_names():
  """``module.`` + torchvision names (no MONAI ``layers.``) into MMNN's image_encoder."""
  monai = monai_state(3)
  sd = {"module." + k.replace(".layers.", "."): v for k, v in monai.items()}
  model = MMNN(n_outcomes=2, image_kwargs=TINY, clinical_kwargs=dict(hidden_sizes=(4,)))
  init = jax.device_get(_fast_jit(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, 8, 8, 8, 2)), jnp.zeros((1, 3)), train=False))())
  new, report = pretrained.load_densenet(init, sd)
  assert report.scope == ("image_encoder",)
  check_elementwise(new, monai, prefix=("image_encoder",))
  for name in ("clinical_encoder", "mm_head", "image_head", "clinical_head"):
    jax.tree.map(np.testing.assert_array_equal, new["params"][name], init["params"][name])
  jax.tree.map(np.testing.assert_array_equal, new["params"]["image_encoder"]["head"],
               init["params"]["image_encoder"]["head"])


def test_strict_errors(tmp_path):
  _, init = tiny_variables()
  sd = monai_state()
  missing = {k: v for k, v in sd.items() if k != "features.norm5.running_var"}
  with pytest.raises(UserError, match=r"1 model variables without.*batch_stats/norm5/bn/var"):
    pretrained.load_densenet(init, missing)
  extra = dict(sd, **{"features.denseblock3.denselayer1.layers.norm1.weight": np.ones(3)})
  with pytest.raises(UserError, match=r"1 unused checkpoint keys: features\.denseblock3"):
    pretrained.load_densenet(init, extra)
  big = dict(sd, **{"features.conv0.weight": np.ones((4, 2, 7, 7, 7), np.float32)})
  with pytest.raises(UserError, match=r"shape mismatch.*features\.conv0\.weight \(4, 2, 7, 7, "
                                      r"7\) -> params/conv0/kernel \(3, 3, 3, 2, 4\)"):
    pretrained.load_densenet(init, big, partial=True)  # Shapes must match even when partial.
  with pytest.raises(UserError, match=r"nowhere\.safetensors does not exist"):
    pretrained.load_densenet(init, tmp_path / "nowhere.safetensors")
  (tmp_path / "w.npz").write_bytes(b"x")
  with pytest.raises(UserError, match=r"w\.npz: unknown suffix"):
    pretrained.load_densenet(init, tmp_path / "w.npz")
  (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
  with pytest.raises(UserError, match=r"cannot read safetensors file .*bad\.safetensors"):
    pretrained.read_state_dict(tmp_path / "bad.safetensors")
  with pytest.raises(UserError, match="init_channels='repeat'"):
    pretrained.load_densenet(init, monai_state(in_channels=1))
  with pytest.raises(UserError, match="must be one of"):
    pretrained.load_densenet(init, sd, channels="mean")
  with pytest.raises(UserError, match="no checkpoint key matches"):
    pretrained.load_densenet(init, {"encoder.conv.weight": np.ones(3)}, partial=True)
  _, group = tiny_variables(norm="group", num_groups=2)
  with pytest.raises(UserError, match="norm='batch'"):
    pretrained.load_densenet(group, sd)


def test_partial_report():
  _, init = tiny_variables()
  sd = {k: v for k, v in monai_state().items() if not k.startswith("features.norm5.")}
  sd["features.extra.weight"] = np.ones(2, np.float32)
  with pytest.raises(UserError, match="no final norm5"):
    pretrained.load_densenet(init, sd)
  new, report = pretrained.load_densenet(init, sd, partial=True)
  assert sorted(report.missing) == ["batch_stats/norm5/bn/mean", "batch_stats/norm5/bn/var",
                                    "params/norm5/bn/bias", "params/norm5/bn/scale"]
  assert report.unused == ["features.extra.weight"]
  assert len(report.loaded) == len(_CONV) + 4 * (len(_NORM) - 1)
  assert "missing 4" in report.summary() and "unused 1" in report.summary()
  jax.tree.map(np.testing.assert_array_equal, new["params"]["norm5"], init["params"]["norm5"])
  np.testing.assert_array_equal(new["params"]["transition1_conv"]["kernel"][0, 0, 0],
                                sd["features.transition1.conv.weight"][:, :, 0, 0, 0].T)


def test_repeat_first_conv_channels():
  """1 checkpoint channel into 2: each model channel gets W / 2."""
  _, init = tiny_variables()
  sd = monai_state(in_channels=1)
  new, report = pretrained.load_densenet(init, sd, channels="repeat")
  w, k = sd["features.conv0.weight"], np.asarray(new["params"]["conv0"]["kernel"])
  for o, i, d, h, x in np.ndindex(4, 2, 3, 3, 3):
    assert k[d, h, x, i, o] == np.float32(w[o, 0, d, h, x] * 0.5)
  assert report.adapted == ["conv0: 1 -> 2 input channels (repeated, scaled by 1/2)"]


def test_torch_file_without_torch(tmp_path, monkeypatch):
  (tmp_path / "w.pth").write_bytes(b"\x80\x04not read")
  monkeypatch.setitem(sys.modules, "torch", None)  # import torch -> ImportError.
  with pytest.raises(UserError, match=r"w\.pth needs torch: install it.*safetensors"):
    pretrained.read_state_dict(tmp_path / "w.pth")


def test_config_fields_and_check(tmp_path):
  from configs import mmnn
  from jaxsurv import train
  c = mmnn.get_config("local")
  assert c.model.image.init_from == "" and c.model.image.init_partial is False
  assert pretrained.check_config(c) is None  # Default: train from scratch.
  c.model.image.update(dict(TINY))
  c.model.image.init_from = str(tmp_path / "missing.pth")
  assert "init_from" not in train.build_model(c).image_kwargs  # Not a DenseNet3D field.
  with pytest.raises(UserError, match=r"missing\.pth does not exist"):
    pretrained.check_config(c)
  save_file(monai_state(), str(tmp_path / "w.safetensors"))
  c.model.image.init_from = str(tmp_path / "w.safetensors")
  report = pretrained.check_config(c)
  assert len(report.loaded) == len(_CONV) + 4 * len(_NORM)
  c.model.image.stem_kernel = 7
  with pytest.raises(UserError, match="shape mismatch"):
    pretrained.check_config(c)
  c.data.modalities = ("clinical",)
  with pytest.raises(UserError, match="no image branch"):
    pretrained.check_config(c)


def test_trainer_loads_on_fresh_start_only(tmp_path):
  """Trainer.fit loads init_from into fresh variables; a resumed run never reads it."""
  from configs import mmnn
  from jaxsurv import train
  from jaxsurv.trainer import loop
  c = mmnn.get_config("local,modalities=image")
  c.model.image.update(dict(TINY, init_from=str(tmp_path / "w.safetensors")))
  c.update_from_flattened_dict({"num_epochs": 1, "batch_size": 4, "eval_batch_size": 4,
                                "optimizer.lr": 0.0, "progress_bar": False,
                                "augment.enabled": False, "log_every_steps": 0})
  sd = monai_state(5)
  save_file(sd, str(tmp_path / "w.safetensors"))
  n = 8
  rng = np.random.default_rng(0)
  arrays = {"inputs": {"image": rng.normal(size=(n, 8, 8, 8, 2)).astype(np.float32)},
            "presence": {}, "duration": rng.uniform(1, 9, (n, 2)).astype(np.float32),
            "event": np.ones((n, 2), np.int32), "outcome_mask": np.ones((n, 2), bool)}
  trainer = train.make_trainer(c)
  # The validation loss in numpy: the eager Cox loss would compile ~100 small ops.
  task = trainer.task
  trainer.task = type("Task", (), dict(
      outcomes=task.outcomes, risk=task.risk, targets=task.targets,
      part_loss=lambda self, out, part, args: float(np.mean(out["mm"]))))()
  part = loop.Part(arrays)
  res = trainer.fit(part, part, checkpoint_dir=tmp_path / "ckpt")
  # lr 0: the parameters stay as loaded (running statistics move in training).
  check_elementwise({"params": res.params}, sd, prefix=("image_encoder",), stats=False)
  conv = np.asarray(res.params["image_encoder"]["conv0"]["kernel"])
  (tmp_path / "w.safetensors").unlink()  # A resumed run must not need the file.
  again = trainer.fit(part, part, checkpoint_dir=tmp_path / "ckpt")
  assert again.resumed_from == 1
  np.testing.assert_array_equal(again.params["image_encoder"]["conv0"]["kernel"], conv)


# ----------------------------------------------------------------------------
# With torch (and MONAI): outputs match.
# ----------------------------------------------------------------------------


def _randomize_bn(torch, net):
  g = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for m in net.modules():
      if isinstance(m, torch.nn.BatchNorm3d):
        m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
        m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
        m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
        m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
  return net.eval()


def test_monai_densenet_outputs_match(tmp_path):
  torch = pytest.importorskip("torch")
  monai_nets = pytest.importorskip("monai.networks.nets")
  torch.manual_seed(0)
  net = _randomize_bn(torch, monai_nets.DenseNet(
      spatial_dims=3, in_channels=2, out_channels=3, init_features=8, growth_rate=4,
      block_config=(2, 2), bn_size=2))
  x = torch.randn(2, 2, 12, 14, 16)  # Distinct D, H, W: the spatial axes keep their order.
  with torch.no_grad():
    fmap = torch.relu(net.features(x))
    pooled = fmap.mean(dim=(2, 3, 4)).numpy()
  torch.save({"state_dict": net.state_dict()}, tmp_path / "monai.pt")
  assert pretrained.convert_to_safetensors(tmp_path / "monai.pt",
                                           tmp_path / "monai.safetensors") > 0
  model = DenseNet3D(init_features=8, growth_rate=4, block_config=(2, 2), bn_size=2,
                     dropout_rate=0.0, head_dropout_rate=0.0, features=3)
  xj = jnp.asarray(x.numpy().transpose(0, 2, 3, 4, 1))  # [B, C, D, H, W] -> [B, D, H, W, C].
  init = jax.device_get(_init(model, xj))
  for name in ("monai.pt", "monai.safetensors"):
    new, report = pretrained.load_densenet(init, tmp_path / name)
    assert sorted(report.head) == ["class_layers.out.bias", "class_layers.out.weight"]
    _, aux = _apply(model, new, xj)
    np.testing.assert_allclose(aux["pooled"], pooled, atol=1e-5, rtol=1e-5, err_msg=name)
    np.testing.assert_allclose(aux["feature_map"], fmap.numpy().transpose(0, 2, 3, 4, 1),
                               atol=1e-5, rtol=1e-5, err_msg=name)


def test_yaware_style_checkpoint_outputs_match(tmp_path):
  """DataParallel torchvision names, wrapped as the y-Aware code saves, no norm5,
  1 channel repeated over 2: the last dense block matches on equal channels."""
  torch = pytest.importorskip("torch")
  from torch import nn

  class Layer(nn.Module):
    def __init__(self, c, growth, bn_size):
      super().__init__()
      self.norm1, self.conv1 = nn.BatchNorm3d(c), nn.Conv3d(c, bn_size * growth, 1, bias=False)
      self.norm2 = nn.BatchNorm3d(bn_size * growth)
      self.conv2 = nn.Conv3d(bn_size * growth, growth, 3, padding=1, bias=False)

    def forward(self, x):
      y = self.conv1(torch.relu(self.norm1(x)))
      return torch.cat([x, self.conv2(torch.relu(self.norm2(y)))], 1)

  features = nn.Sequential()
  features.add_module("conv0", nn.Conv3d(1, 4, 3, stride=2, padding=1, bias=False))
  features.add_module("norm0", nn.BatchNorm3d(4))
  features.add_module("relu0", nn.ReLU())
  features.add_module("pool0", nn.MaxPool3d(3, stride=2, padding=1))
  features.add_module("denseblock1", nn.Sequential())
  features.denseblock1.add_module("denselayer1", Layer(4, 2, 2))
  transition = nn.Sequential()
  for name, m in (("norm", nn.BatchNorm3d(6)), ("relu", nn.ReLU()),
                  ("conv", nn.Conv3d(6, 3, 1, bias=False)), ("pool", nn.AvgPool3d(2, 2))):
    transition.add_module(name, m)
  features.add_module("transition1", transition)
  features.add_module("denseblock2", nn.Sequential())
  features.denseblock2.add_module("denselayer1", Layer(3, 2, 2))
  net = nn.Module()
  net.features = features
  net.hidden_representation, net.head_projection = nn.Linear(5, 8), nn.Linear(8, 4)
  torch.manual_seed(0)
  _randomize_bn(torch, net)
  x = torch.randn(2, 1, 10, 12, 14)
  with torch.no_grad():
    last = net.features(x).numpy().transpose(0, 2, 3, 4, 1)
  state = {"module." + k: v for k, v in net.state_dict().items()}
  torch.save({"epoch": 3, "model": state, "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4}]}},
             tmp_path / "yaware.pth")
  model, init = tiny_variables()
  with pytest.raises(UserError, match="no final norm5"):
    pretrained.load_densenet(init, tmp_path / "yaware.pth", channels="repeat")
  new, report = pretrained.load_densenet(init, tmp_path / "yaware.pth", partial=True,
                                         channels="repeat")
  assert len(report.missing) == 4 and not report.unused and len(report.head) == 4
  xj = jnp.asarray(np.repeat(x.numpy().transpose(0, 2, 3, 4, 1), 2, axis=-1))
  _, aux = _apply(model, new, xj)
  np.testing.assert_allclose(aux["last_dense_block"], last, atol=1e-5, rtol=1e-5)
