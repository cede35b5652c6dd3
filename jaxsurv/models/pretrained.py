r"""Pretrained PyTorch (MONAI / torchvision-style) DenseNet weights into ``DenseNet3D``.

The MMNN paper initialises its image branch from a DenseNet-121 pretrained
self-supervised on BHB-10k brain MRI (y-Aware contrastive learning,
Dufumier et al., "Contrastive learning with continuous proxy meta-data for
3D MRI classification", MICCAI 2021; public code and checkpoint
``DenseNet121_BHB-10K_yAwareContrastive.pth`` at
github.com/Duplums/yAwareContrastiveLearning). This module reads such a
PyTorch state dict and writes it into the ``params`` and ``batch_stats`` of
a :class:`jaxsurv.models.DenseNet3D`, on its own or nested in
:class:`jaxsurv.models.MMNN` (submodule ``image_encoder``).

Reading (never a plain unpickle):

* ``.safetensors``: ``safetensors.numpy.load_file``;
* ``.pt`` / ``.pth`` / ``.bin`` / ``.ckpt``: ``torch.load(path,
  map_location="cpu", weights_only=True)`` when PyTorch is installed (a
  :class:`UserError` says to install it or to convert the file with
  :func:`convert_to_safetensors` elsewhere when it is not). A checkpoint that
  wraps the state dict (a mapping whose values are not all tensors) is
  unwrapped under its first key among :data:`WRAPPER_KEYS` (``"state_dict"``,
  ``"model"``, ``"model_state_dict"``), up to 3 levels: the y-Aware code saves
  ``{"epoch", "model", "optimizer"}``. Floating tensors become float32.

Key names (:func:`canonical_key`), in this order:

1. every leading ``module.`` is removed (``torch.nn.DataParallel`` /
   ``DistributedDataParallel``; the y-Aware checkpoint was saved from one);
2. one leading ``features.`` is removed (``DenseNet.features`` in MONAI,
   torchvision and the y-Aware code);
3. MONAI's ``layers.`` segment inside a dense layer is removed
   (``denseblock1.denselayer1.layers.norm1`` ->
   ``denseblock1.denselayer1.norm1``, the torchvision / y-Aware name).

The canonical names and the ``DenseNet3D`` variables they fill:

=========================================  ==========================================
checkpoint (canonical)                      ``DenseNet3D``
=========================================  ==========================================
``conv0.weight``                            ``conv0/kernel``
``norm0.{weight,bias}``                     ``norm0/bn/{scale,bias}`` (params)
``norm0.{running_mean,running_var}``        ``norm0/bn/{mean,var}`` (batch_stats)
``denseblockB.denselayerL.normK.*``         ``blockB_layerL/normK/bn/*`` (K = 1, 2)
``denseblockB.denselayerL.convK.weight``    ``blockB_layerL/convK/kernel``
``transitionB.norm.*``                      ``transitionB_norm/bn/*``
``transitionB.conv.weight``                 ``transitionB_conv/kernel``
``norm5.*``                                 ``norm5/bn/*``
=========================================  ==========================================

Convolution weights are transposed from PyTorch's ``[out, in, kd, kh, kw]``
to Flax's ``[kd, kh, kw, in, out]`` (``transpose(2, 3, 4, 1, 0)``): PyTorch's
``Conv3d`` takes ``[batch, channels, D, H, W]`` and jaxsurv ``[batch, depth,
height, width, channels]``, so the spatial axes keep their order and the same
volume gives the same features (``tests/test_pretrained.py`` checks it
against MONAI's network to 1e-5). ``num_batches_tracked`` is ignored. The
classification / projection heads (canonical names starting with one of
:data:`HEAD_PREFIXES`: MONAI's ``class_layers.``, torchvision's
``classifier.``, the y-Aware encoder's ``hidden_representation.`` and
``head_projection.``) are never loaded: ``DenseNet3D``'s ``head`` (MMNN's
1024 -> 12 Linear) keeps its random initialisation, as in the paper.

Strictness (default): every ``DenseNet3D`` variable up to ``norm5`` needs a
checkpoint entry, every checkpoint entry other than the head must be used,
and shapes must match; otherwise a :class:`UserError` lists the first
offending keys. ``partial=True`` loads what matches and leaves the rest at
its initial value, returning (and logging) a :class:`LoadReport`; a shape
mismatch stays an error, and so does a checkpoint of which nothing matches.
The y-Aware checkpoint's encoder has no ``norm5`` (its "encoder" mode adds
``norm5`` only for classification), so it loads with ``partial=True`` only.

First-convolution channels (``channels``): the pretrained network has 1 input
channel, MMNN 2 (T1c, T2-FS). ``"error"`` (default) rejects the mismatch;
``"repeat"`` gives model input channel ``i`` the checkpoint's channel
``i mod c0`` scaled by ``c0 / C`` (``c0`` checkpoint channels, ``C`` model
channels; for ``c0 = 1``: the kernel repeated over the C channels and divided
by C), so that a volume whose C channels are equal gives the pretrained
response. This is the convention of timm's ``adapt_input_conv`` and
segmentation_models_pytorch's ``patch_first_conv``, the channel analogue of
the "repeat along time, divide by N" inflation of I3D (Carreira & Zisserman,
CVPR 2017, Sec. 2.3).

Training (``jaxsurv.trainer.loop.Trainer.fit``) applies
``config.model.image.init_from`` (with ``init_partial`` and
``init_channels``) to fresh variables only, never on resume; ``jaxsurv.train``
checks it (:func:`check_config`) before the workdir is written.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
import re
from typing import Any, Mapping

import numpy as np
from flax import traverse_util

from jaxsurv.errors import UserError

log = logging.getLogger("jaxsurv")

# Config fields of ``config.model.image`` read here, not by ``DenseNet3D``.
CONFIG_FIELDS = ("init_from", "init_partial", "init_channels")
CHANNEL_MODES = ("error", "repeat")
WRAPPER_KEYS = ("state_dict", "model", "model_state_dict")
HEAD_PREFIXES = ("class_layers.", "classifier.", "hidden_representation.", "head_projection.")
SAFETENSORS_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
_SHOW = 5  # Offending keys listed per kind in an error.

_BN_PARAMS = {"scale": "weight", "bias": "bias"}
_BN_STATS = {"mean": "running_mean", "var": "running_var"}


@dataclasses.dataclass
class LoadReport:
  """What :func:`load_densenet` did.

  Attributes:
    source: the file (or ``"<state dict>"``).
    scope: the ``DenseNet3D`` module path in the variables (``()`` for a bare
      ``DenseNet3D``, ``("image_encoder",)`` in MMNN).
    loaded: checkpoint keys (as in the file) written into the model.
    missing: model variables (``"params/image_encoder/norm5/bn/scale"``) the
      checkpoint has no entry for (kept at their initial value).
    unused: checkpoint keys used by nothing (heads and ``num_batches_tracked``
      aside).
    head: head keys skipped on purpose (:data:`HEAD_PREFIXES`).
    adapted: first-convolution adaptations (``channels="repeat"``).
  """
  source: str
  scope: tuple
  loaded: list = dataclasses.field(default_factory=list)
  missing: list = dataclasses.field(default_factory=list)
  unused: list = dataclasses.field(default_factory=list)
  head: list = dataclasses.field(default_factory=list)
  adapted: list = dataclasses.field(default_factory=list)

  def summary(self) -> str:
    """One line: counts and the first keys of each non-empty list."""
    where = "/".join(self.scope) or "DenseNet3D"
    parts = [f"loaded {len(self.loaded)} arrays from {self.source} into {where}"]
    for name in ("missing", "unused", "head", "adapted"):
      items = getattr(self, name)
      if items:
        parts.append(f"{name} {len(items)}: {_first(items)}")
    return "; ".join(parts)


def _first(items, n: int = _SHOW) -> str:
  items = list(items)
  more = f" and {len(items) - n} more" if len(items) > n else ""
  return ", ".join(items[:n]) + more


# ----------------------------------------------------------------------------
# Reading.
# ----------------------------------------------------------------------------


def read_state_dict(path) -> dict[str, np.ndarray]:
  """The state dict in a ``.safetensors`` or PyTorch file, as numpy arrays.

  Args:
    path: a ``.safetensors``, ``.pt``, ``.pth``, ``.bin`` or ``.ckpt`` file.

  Returns:
    ``{key: array}`` with the file's own key names (floating arrays float32).

  Raises:
    UserError: the file does not exist, has another suffix, cannot be read,
      holds no state dict, or (PyTorch files) torch is not installed.
  """
  p = pathlib.Path(path).expanduser()
  if not p.is_file():
    raise UserError(f"pretrained weights file {p} does not exist (or is not a file)")
  suffix = p.suffix.lower()
  if suffix in SAFETENSORS_SUFFIXES:
    try:
      from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
    except ImportError as e:
      raise UserError(f"reading {p} needs the safetensors package "
                      "(pip install -r requirements.txt)") from e
    try:
      state = load_file(str(p))
    except Exception as e:  # pylint: disable=broad-except
      raise UserError(f"cannot read safetensors file {p}: {type(e).__name__}: {e} (bfloat16 "
                      "arrays are not readable with numpy: save float32)") from e
    return {k: _float32(v) for k, v in state.items()}
  if suffix in TORCH_SUFFIXES:
    return _read_torch(p)
  raise UserError(f"pretrained weights file {p}: unknown suffix {p.suffix!r}; expected "
                  f"{SAFETENSORS_SUFFIXES + TORCH_SUFFIXES}")


def _float32(a: np.ndarray) -> np.ndarray:
  a = np.asarray(a)
  return a.astype(np.float32) if np.issubdtype(a.dtype, np.floating) else a


def _read_torch(p: pathlib.Path) -> dict[str, np.ndarray]:
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise UserError(f"reading the PyTorch file {p} needs torch: install it (a CPU build is "
                    "enough), or convert the file to .safetensors on a machine that has it "
                    "(jaxsurv.models.pretrained.convert_to_safetensors)") from e
  try:
    obj = torch.load(p, map_location="cpu", weights_only=True)
  except Exception as e:  # pylint: disable=broad-except
    raise UserError(f"cannot read {p} with torch.load(weights_only=True): {type(e).__name__}: "
                    f"{str(e).splitlines()[0] if str(e) else ''} (only tensors and plain "
                    "containers are accepted: save model.state_dict(), not the model)") from e
  state = _unwrap(obj, p, torch.is_tensor)
  out = {}
  for k, t in state.items():
    t = t.detach().cpu()
    if t.is_floating_point():
      t = t.to(torch.float32)
    out[str(k)] = t.numpy()
  return out


def _unwrap(obj, p: pathlib.Path, is_tensor) -> Mapping:
  """The mapping of tensors in ``obj``, unwrapping :data:`WRAPPER_KEYS` (3 levels)."""
  for _ in range(4):
    if not isinstance(obj, Mapping):
      raise UserError(f"{p} holds a {type(obj).__name__}, not a state dict (a mapping of "
                      "tensor names to tensors)")
    if obj and all(is_tensor(v) for v in obj.values()):
      return obj
    inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
    if inner is None:
      raise UserError(f"{p} holds no state dict: its top-level keys are "
                      f"{_first(map(str, obj))}; expected a mapping of tensors, or one under "
                      f"{list(WRAPPER_KEYS)}")
    obj = inner
  raise UserError(f"{p}: no state dict within 3 levels of {list(WRAPPER_KEYS)}")


def convert_to_safetensors(src, dst) -> int:
  """Writes the state dict of PyTorch file ``src`` to ``dst`` (.safetensors, float32).

  Needs torch (on the machine that converts); the result loads without it.
  Key names are kept as in ``src`` (prefixes are stripped when loading).

  Returns:
    The number of arrays written.

  Raises:
    UserError: as :func:`read_state_dict`, or ``dst`` not ending in
      ``.safetensors``.
  """
  dst = pathlib.Path(dst)
  if dst.suffix.lower() != ".safetensors":
    raise UserError(f"convert_to_safetensors writes a .safetensors file, got {dst}")
  state = read_state_dict(src)
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, str(dst))
  return len(state)


# ----------------------------------------------------------------------------
# Names.
# ----------------------------------------------------------------------------


def canonical_key(key: str) -> str:
  """The torchvision-style name of checkpoint key ``key`` (module docstring)."""
  k = key
  while k.startswith("module."):
    k = k[len("module."):]
  if k.startswith("features."):
    k = k[len("features."):]
  return re.sub(r"^(denseblock\d+\.denselayer\d+\.)layers\.", r"\1", k)


def _torch_name(path: tuple, collection: str) -> str | None:
  """Canonical checkpoint name of a ``DenseNet3D`` variable (path below the module).

  None for the head (never loaded).

  Raises:
    UserError: GroupNorm variables (pretrained BatchNorm cannot fill them).
  """
  if path[0] in ("head", "head_dropout"):
    return None
  if "gn" in path:
    raise UserError("pretrained DenseNet weights need BatchNorm: set "
                    "config.model.image.norm='batch' (the model uses GroupNorm)")
  first, leaf = path[0], path[-1]
  m = re.fullmatch(r"block(\d+)_layer(\d+)", first)
  t = re.fullmatch(r"transition(\d+)_(norm|conv)", first)
  if m:
    module = f"denseblock{m[1]}.denselayer{m[2]}.{path[1]}"
  elif t:
    module = f"transition{t[1]}.{t[2]}"
  elif first in ("conv0", "norm0", "norm5"):
    module = first
  else:
    raise ValueError(f"DenseNet3D variable {'/'.join(path)} has no checkpoint name")
  if leaf == "kernel":
    return module + ".weight"
  table = _BN_STATS if collection == "batch_stats" else _BN_PARAMS
  return f"{module}.{table[leaf]}"


def densenet_scopes(params: Mapping) -> list[tuple]:
  """Module paths in ``params`` that hold a ``DenseNet3D`` (``conv0`` and ``norm5``)."""
  flat = traverse_util.flatten_dict(params)
  convs = {k[:-2] for k in flat if k[-2:] == ("conv0", "kernel")}
  return sorted(s for s in convs if any(k[:len(s) + 1] == s + ("norm5",) for k in flat))


# ----------------------------------------------------------------------------
# Loading.
# ----------------------------------------------------------------------------


def load_densenet(variables: Mapping, source, *, scope: tuple | None = None,
                  partial: bool = False, channels: str = "error") -> tuple[dict, LoadReport]:
  """Writes a PyTorch DenseNet state dict into the DenseNet3D of ``variables``.

  Args:
    variables: ``{"params": ..., "batch_stats": ...}`` of a model with a
      ``DenseNet3D`` (BatchNorm); leaves may be arrays or
      ``jax.ShapeDtypeStruct`` (only shapes and dtypes are read).
    source: a file path (:func:`read_state_dict`) or a ``{key: array}``
      state dict.
    scope: the DenseNet3D's module path (None: the only one found, e.g.
      ``("image_encoder",)`` in MMNN, ``()`` for a bare DenseNet3D).
    partial: allow missing model variables and unused checkpoint keys.
    channels: first-convolution input-channel mismatch: ``"error"`` or
      ``"repeat"`` (module docstring).

  Returns:
    ``(new_variables, report)``: plain nested dicts, the loaded leaves as
    numpy arrays of the model's dtype, everything else as given.

  Raises:
    UserError: unreadable source, no (or several) DenseNet3D without a
      ``scope``, GroupNorm, a shape mismatch, key collisions after prefix
      stripping, nothing loaded, or (strict) missing / unused keys.
  """
  if channels not in CHANNEL_MODES:
    raise UserError(f"channels (config.model.image.init_channels) must be one of "
                    f"{CHANNEL_MODES}, got {channels!r}")
  if isinstance(source, Mapping):
    name, raw = "<state dict>", {str(k): _float32(v) for k, v in source.items()}
  else:
    name, raw = str(source), read_state_dict(source)
  params = variables["params"]
  if scope is None:
    scopes = densenet_scopes(params)
    if len(scopes) != 1:
      raise UserError(f"the model has {len(scopes)} DenseNet3D modules "
                      f"({['/'.join(s) for s in scopes]}); pretrained DenseNet weights need "
                      "exactly one (or an explicit scope)")
    scope = scopes[0]
  scope = tuple(scope)
  report = LoadReport(source=name, scope=scope)

  ckpt: dict[str, tuple[str, np.ndarray]] = {}  # canonical -> (original key, array)
  for key, arr in raw.items():
    if key.endswith("num_batches_tracked"):
      continue
    canon = canonical_key(key)
    if canon.startswith(HEAD_PREFIXES):
      report.head.append(key)
      continue
    if canon in ckpt:
      raise UserError(f"{name}: keys {ckpt[canon][0]!r} and {key!r} both name {canon!r} once "
                      "the module./features. prefixes are stripped")
    ckpt[canon] = (key, arr)

  flat = {c: traverse_util.flatten_dict(dict(variables.get(c, {})))
          for c in ("params", "batch_stats")}
  used, mismatched, hint = set(), [], ""
  for collection, tree in flat.items():
    for path, like in tree.items():
      if path[:len(scope)] != scope:
        continue
      rel = path[len(scope):]
      canon = _torch_name(rel, collection)
      if canon is None:
        continue
      full = "/".join((collection,) + path)
      if canon not in ckpt:
        report.missing.append(full)
        continue
      key, arr = ckpt[canon]
      used.add(canon)
      value = _convert(arr, rel, tuple(like.shape), channels, report)
      if value is None:
        mismatched.append(f"{key} {tuple(arr.shape)} -> {full} {tuple(like.shape)}")
        if (rel == ("conv0", "kernel") and arr.ndim == 5 and len(like.shape) == 5
            and arr.shape[1] != like.shape[3] and arr.shape[0] == like.shape[4]
            and arr.shape[2:] == tuple(like.shape[:3])):
          hint = ("; the first convolution's input channels differ: channels='repeat' "
                  "(config.model.image.init_channels='repeat') adapts them")
        continue
      tree[path] = value.astype(like.dtype)
      report.loaded.append(key)
  report.unused = sorted(ckpt[c][0] for c in set(ckpt) - used)

  if mismatched:
    hint = hint or ("; the checkpoint's network differs from the model's (compare "
                    "init_features, growth_rate, block_config, bn_size, stem_kernel)")
    raise UserError(f"{name}: {len(mismatched)} shape mismatches (checkpoint, PyTorch layout "
                    f"-> model, Flax layout): {_first(mismatched)}{hint}")
  if not report.loaded:
    raise UserError(f"{name}: no checkpoint key matches the DenseNet3D "
                    f"({'/'.join(scope) or 'root'}): checkpoint keys {_first(sorted(raw))}")
  if not partial and (report.missing or report.unused):
    msg = [f"{name} does not match the DenseNet3D exactly"]
    if report.missing:
      msg.append(f"{len(report.missing)} model variables without a checkpoint entry: "
                 f"{_first(report.missing)}")
    if report.unused:
      msg.append(f"{len(report.unused)} unused checkpoint keys: {_first(report.unused)}")
    if report.missing and all("/norm5/" in m for m in report.missing):
      msg.append("the checkpoint has no final norm5 (the y-Aware encoder has none)")
    msg.append("check the architecture settings, or load what matches with partial=True "
               "(config.model.image.init_partial=True)")
    raise UserError("; ".join(msg))
  new = dict(variables)
  for collection, tree in flat.items():
    if collection in variables:
      new[collection] = traverse_util.unflatten_dict(tree)
  if partial and (report.missing or report.unused):
    log.warning("partial pretrained load: %s", report.summary())
  else:
    log.info("pretrained load: %s", report.summary())
  return new, report


def _convert(arr: np.ndarray, rel: tuple, shape: tuple, channels: str,
             report: LoadReport) -> np.ndarray | None:
  """The checkpoint array in the model's layout, or None on a shape mismatch."""
  arr = np.asarray(arr)
  if rel[-1] == "kernel":
    if arr.ndim != 5:
      return None
    arr = arr.transpose(2, 3, 4, 1, 0)  # [out, in, kd, kh, kw] -> [kd, kh, kw, in, out].
    c0, c = arr.shape[3], shape[3] if len(shape) == 5 else None
    if (rel[0] == "conv0" and channels == "repeat" and c is not None and c0 != c
        and arr.shape[:3] + arr.shape[4:] == shape[:3] + shape[4:]):
      arr = arr[:, :, :, np.arange(c) % c0, :] * (c0 / c)
      report.adapted.append(f"conv0: {c0} -> {c} input channels (repeated, scaled by {c0}/{c})")
  return arr if arr.shape == shape else None


# ----------------------------------------------------------------------------
# Config (config.model.image.init_from / init_partial / init_channels).
# ----------------------------------------------------------------------------


def _image_config(config):
  model = config.get("model", None) if hasattr(config, "get") else None
  image = model.get("image", None) if model is not None and hasattr(model, "get") else None
  return image if image is not None and hasattr(image, "get") else None


def densenet_kwargs(image_config) -> dict:
  """``config.model.image`` as ``DenseNet3D`` keyword arguments (without
  :data:`CONFIG_FIELDS`)."""
  return {k: v for k, v in dict(image_config).items() if k not in CONFIG_FIELDS}


def init_from(config) -> str:
  """``config.model.image.init_from`` ("" when unset: train from scratch)."""
  image = _image_config(config)
  return str(image.get("init_from", "") or "") if image is not None else ""


def load_from_config(config, params, batch_stats) -> tuple[dict, dict]:
  """Fresh ``(params, batch_stats)`` with ``config.model.image.init_from`` loaded.

  Unchanged when ``init_from`` is empty.

  Raises:
    UserError: as :func:`load_densenet`.
  """
  path = init_from(config)
  if not path:
    return params, batch_stats
  image = _image_config(config)
  new, _ = load_densenet({"params": params, "batch_stats": batch_stats or {}}, path,
                         partial=bool(image.get("init_partial", False)),
                         channels=str(image.get("init_channels", "error")))
  return new["params"], new["batch_stats"]


def check_config(config) -> LoadReport | None:
  """Checks ``config.model.image.init_from`` against the configured DenseNet3D.

  Reads the file and loads it into abstract variables (shapes only) of
  ``DenseNet3D(**densenet_kwargs(config.model.image))`` with
  ``len(config.data.channels)`` input channels, so that a bad path or
  checkpoint fails before anything is written.

  Returns:
    The report, or None when ``init_from`` is empty.

  Raises:
    UserError: ``init_from`` set for a model without an image branch, or as
      :func:`load_densenet`.
  """
  path = init_from(config)
  if not path:
    return None
  mods = tuple(config.data.get("modalities", ("image",)))
  if "image" not in mods:
    raise UserError(f"config.model.image.init_from={path!r} is set but the model has no image "
                    f"branch (config.data.modalities={mods})")
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from jaxsurv.models.densenet3d import DenseNet3D  # pylint: disable=import-outside-toplevel
  image = _image_config(config)
  model = DenseNet3D(**densenet_kwargs(image))
  n = model.min_input_size()
  x = jax.ShapeDtypeStruct((1, n, n, n, len(config.data.channels)), jnp.float32)
  abstract = jax.eval_shape(lambda v: model.init(jax.random.key(0), v, train=False), x)
  _, report = load_densenet(abstract, path, partial=bool(image.get("init_partial", False)),
                            channels=str(image.get("init_channels", "error")))
  return report
