r"""3D Grad-CAM for survival models: which voxels raise (or lower) a patient's log-hazard.

Grad-CAM (Selvaraju et al., "Grad-CAM: Visual Explanations from Deep Networks
via Gradient-based Localization", ICCV 2017, eqs. 1-2), in 3D and per outcome:
for the risk score (log-hazard) ``S_k`` of outcome ``k`` and the activations
``A`` ``[d, h, w, C]`` of a chosen layer,

  alpha_kc = mean_{x,y,z} dS_k / dA_c(x, y, z)          (eq. 1: spatial mean)
  L_k      = ReLU(sum_c alpha_kc A_c)                    (eq. 2)

then ``L_k`` is upsampled trilinearly (``jax.image.resize``, half-voxel
centres) to the model's input grid and divided by its maximum, per patient and
outcome, so every map lies in [0, 1] with 1 at its hottest voxel. A map whose
maximum is 0 (no voxel raises the risk) stays all zeros; ``peak`` keeps the
un-normalised maximum so that such maps and weak maps can be told apart.

Sign (``sign=``; every figure or table of these maps must state which one it
shows). The ReLU of eq. 2 keeps only the evidence that *raises* the explained
score, so a low-risk patient whose image mostly lowers the log-hazard gets a
weak or all-zero map:
* ``"increasing"`` (default): the score is the log-hazard ``S_k``; the map
  shows what raises the risk (Selvaraju et al.'s Grad-CAM of the class score);
* ``"decreasing"``: the score is ``-S_k``, whose weights are ``-alpha_kc``,
  so ``L_k = ReLU(-sum_c alpha_kc A_c)`` (``alpha_kc`` of eq. 1): the map
  shows what lowers the log-hazard. This is the
  "Counterfactual Explanations" variant of Selvaraju et al. (2017; the
  subsection of that name negates the gradients), applied to a regression
  score.
``GradCAM.scores`` is the log-hazard ``S_k`` under either sign; ``weights``
are the alphas of the explained score (``-S_k`` for ``"decreasing"``).

Differences from the MMNN implementation (DigITs-AIML/MMNN_STS
``utils/utils.py``), on purpose:
* the layer is the last dense block's output (``"last_dense_block"``, all its
  channels), not the last 32-channel bottleneck conv of the block;
* the ReLU of eq. 2 is applied (MMNN min-max scales the signed map);
* nothing is mutated: each outcome's gradient comes from its own
  vector-Jacobian product of one forward pass, so outcomes never share state
  (MMNN's in-place multiply leaks outcome 1's weights into outcome 2's map);
* any batch size: in eval mode (BatchNorm running statistics, no dropout) a
  patient's outputs do not depend on the other patients of the batch, so one
  backward pass of ``sum_b S_k[b]`` gives every patient's own gradient.

Mechanisms (all pure functions of the inputs, jittable):
* ``grad_cam_from_gradients``: eqs. 1-2, upsampling and normalisation from
  activations and their gradients;
* ``layer_grad_cam``: any Flax Linen model, any submodule's output (addressed
  by its module path, e.g. ``"features"`` or ``"image_encoder/norm5"``), via
  ``flax.linen.intercept_methods``;
* ``mmnn_grad_cam``: ``jaxsurv.models.MMNN``; the default layer
  ``"last_dense_block"`` uses the ``perturbations`` variable that
  ``DenseNet3D(perturb_last_block=True)`` adds, ``"block_<i>"`` and module
  names go through ``layer_grad_cam``.

Known limitation: the upsampling assumes each layer voxel is centred on the
block of ``s`` input voxels it tiles (half-voxel centres, ``s*i + (s-1)/2``).
In DenseNet3D the stem (odd kernel, symmetric padding, then a 3^3 max-pool)
centres a stride-``s`` voxel at ``s*i + (s-4)/2`` instead, so the upsampled
map sits 1.5 input voxels further along each axis than the receptive-field
centres, for any depth. That is far below Grad-CAM's own resolution (one
layer voxel = ``s`` input voxels, e.g. 16 at DenseNet-121) and is not
corrected.

Writing: ``save_heatmap_nifti`` maps a grid-space map back onto the original
scan (``PreprocessedCase.to_original_space``) and writes NIfTI with the scan's
geometry, so it opens over the original file in 3D Slicer or ITK-SNAP;
``save_overlay_png`` draws the three orthogonal slices through the tumour
centre (matplotlib, Agg canvas).
"""

from __future__ import annotations

import os
import pathlib
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

LAST_DENSE_BLOCK = "last_dense_block"
_PERTURBATIONS = "perturbations"

PathLike = str | os.PathLike
SIGNS = ("increasing", "decreasing")


class GradCAM(NamedTuple):
  """Grad-CAM maps of a batch.

  Attributes:
    cam: ``[batch, outcomes, D, H, W]`` float32 maps on the input grid,
      normalised to [0, 1] per patient and outcome (1 = hottest voxel; all
      zeros when no voxel raises the risk).
    peak: ``[batch, outcomes]`` maximum of each map before normalisation
      (units of log-hazard per activation unit); 0 means an all-zero map.
    weights: ``[batch, outcomes, channels]`` channel weights alpha (eq. 1) of
      the explained score: the log-hazard (``sign="increasing"``) or minus it
      (``sign="decreasing"``).
    scores: ``[batch, outcomes]`` the explained log-hazards (never negated).
  """
  cam: jax.Array
  peak: jax.Array
  weights: jax.Array
  scores: jax.Array


def _check_sign(sign: str) -> str:
  if sign not in SIGNS:
    raise ValueError(f"sign: expected one of {list(SIGNS)} (the evidence that raises or lowers "
                     f"the log-hazard), got {sign!r}")
  return sign


def grad_cam_from_gradients(activations: jax.Array, gradients: jax.Array,
                            input_spatial: Sequence[int], scores: jax.Array | None = None,
                            *, sign: str = "increasing") -> GradCAM:
  """Grad-CAM (Selvaraju et al. 2017, eqs. 1-2) from activations and their gradients.

  Args:
    activations: ``[batch, d, h, w, channels]`` activations A of the layer.
    gradients: ``[outcomes, batch, d, h, w, channels]`` dS_k/dA, one slice per
      outcome k (each patient's own gradient).
    input_spatial: ``(D, H, W)`` input grid to upsample to (trilinear).
    scores: optional ``[batch, outcomes]`` log-hazards, passed through.
    sign: ``"increasing"`` (default: the map of ``S_k``, what raises the
      log-hazard) or ``"decreasing"`` (the map of ``-S_k``: the gradients are
      negated, so ``L_k = ReLU(-sum_c alpha_kc A_c)``; module docstring).

  Returns:
    ``GradCAM`` (maps normalised per patient and outcome, see the module
    docstring).

  Raises:
    ValueError: if the shapes do not fit together, or an unknown ``sign``.
  """
  _check_sign(sign)
  a = jnp.asarray(activations, jnp.float32)
  g = jnp.asarray(gradients, jnp.float32)
  if sign == "decreasing":
    g = -g  # The gradient of -S_k.
  if a.ndim != 5 or g.ndim != 6 or g.shape[1:] != a.shape:
    raise ValueError(f"activations must be [batch, d, h, w, channels] and gradients "
                     f"[outcomes, batch, d, h, w, channels] of the same layer; got "
                     f"{tuple(a.shape)} and {tuple(g.shape)}")
  spatial = tuple(int(s) for s in input_spatial)
  if len(spatial) != 3 or min(spatial) < 1:
    raise ValueError(f"input_spatial: expected 3 positive sizes (D, H, W), got {input_spatial!r}")
  weights = jnp.mean(g, axis=(2, 3, 4))  # [K, B, C]  (eq. 1)
  cam = jax.nn.relu(jnp.einsum("kbc,bdhwc->bkdhw", weights, a))  # eq. 2
  # Trilinear interpolation is a convex combination: the map stays >= 0.
  cam = jax.image.resize(cam, cam.shape[:2] + spatial, method="trilinear")
  peak = jnp.max(cam, axis=(2, 3, 4))
  safe = jnp.where(peak > 0, peak, 1.0)
  cam = jnp.where(peak[..., None, None, None] > 0, cam / safe[..., None, None, None], 0.0)
  if scores is None:
    scores = jnp.full(peak.shape, jnp.nan, jnp.float32)
  return GradCAM(cam=cam, peak=peak, weights=jnp.swapaxes(weights, 0, 1),
                 scores=jnp.asarray(scores, jnp.float32))


def _per_outcome_gradients(forward: Callable[[jax.Array], tuple[jax.Array, jax.Array]],
                           delta: jax.Array):
  """Scores, activations and per-outcome gradients with respect to a layer.

  ``forward(delta)`` runs the model with ``delta`` added to the layer's output
  and returns ``(scores [batch, K], activations [batch, d, h, w, C])``. One
  forward pass, then one vector-Jacobian product per outcome (vmapped).

  Returns:
    ``(scores [B, K], activations [B, d, h, w, C], grads [K, B, d, h, w, C])``.
  """
  scores, vjp_fn, acts = jax.vjp(forward, delta, has_aux=True)
  if scores.ndim != 2:
    raise ValueError(f"scores must be [batch, outcomes], got shape {tuple(scores.shape)}")
  k = scores.shape[1]
  # Cotangent e_k on every patient's row: d(sum_b S_k[b]) / d delta.
  cot = jnp.broadcast_to(jnp.eye(k, dtype=scores.dtype)[:, None, :], (k,) + scores.shape)
  (grads,) = jax.vmap(vjp_fn)(cot)
  return scores, acts, grads


def _module_path(layer: str | Sequence[str]) -> tuple[str, ...]:
  if isinstance(layer, str):
    path = tuple(p for p in layer.split("/") if p)
  else:
    path = tuple(layer)
  if not path:
    raise ValueError(f"layer: expected a module path such as 'image_encoder/norm5', got {layer!r}")
  return path


def layer_grad_cam(model: nn.Module, variables: Mapping[str, Any], *args,
                   layer: str | Sequence[str], input_spatial: Sequence[int],
                   score_fn: Callable[[Any], jax.Array] = lambda out: out,
                   sign: str = "increasing", **apply_kwargs) -> GradCAM:
  """Grad-CAM at the output of any submodule of a Flax Linen model.

  The layer's output is intercepted (``flax.linen.intercept_methods``) and a
  zero perturbation is added to it, so the gradient with respect to that
  perturbation is dS/dA. Apply the model in eval mode (e.g. ``train=False``):
  then patients are independent and the result is per patient.

  Args:
    model: the Flax module.
    variables: its variables (``{"params": ..., "batch_stats": ...}``).
    *args: positional inputs of ``model.apply``.
    layer: module path of the layer, ``"a/b"`` or ``("a", "b")`` (names as
      in the parameter tree); its ``__call__`` output must be
      ``[batch, d, h, w, channels]`` and it must run exactly once.
    input_spatial: ``(D, H, W)`` grid to upsample the maps to.
    score_fn: maps ``model.apply``'s output to ``[batch, outcomes]`` scores.
    sign: ``"increasing"`` (default) or ``"decreasing"``: map the evidence
      that raises or lowers the scores (``grad_cam_from_gradients``).
    **apply_kwargs: keyword arguments of ``model.apply`` (e.g. ``train=False``).

  Returns:
    ``GradCAM``.

  Raises:
    ValueError: the layer never runs, runs more than once, or its output is
      not 5-D; scores not ``[batch, outcomes]``; an unknown ``sign``.
  """
  _check_sign(sign)
  path = _module_path(layer)

  def run(delta):
    captured = []

    def interceptor(next_fun, call_args, call_kwargs, context):
      out = next_fun(*call_args, **call_kwargs)
      if context.method_name == "__call__" and tuple(context.module.path) == path:
        if captured:
          raise ValueError(f"layer {'/'.join(path)!r} runs more than once per forward pass; "
                           "Grad-CAM needs a single activation map")
        if not hasattr(out, "ndim") or out.ndim != 5:
          raise ValueError(f"layer {'/'.join(path)!r}: expected a [batch, d, h, w, channels] "
                           f"output, got {getattr(out, 'shape', type(out).__name__)}")
        if delta is not None:
          out = out + delta.astype(out.dtype)
        captured.append(out)
      return out

    with nn.intercept_methods(interceptor):
      out = model.apply(variables, *args, **apply_kwargs)
    if not captured:
      raise ValueError(f"layer {'/'.join(path)!r} did not run: no submodule has that path "
                       "(paths are the nested names of the parameter tree, e.g. "
                       "'image_encoder/norm5')")
    return score_fn(out), captured[0]

  shape = jax.eval_shape(lambda: run(None))[1]
  delta = jnp.zeros(shape.shape, shape.dtype)
  scores, acts, grads = _per_outcome_gradients(run, delta)
  return grad_cam_from_gradients(acts, grads, input_spatial, scores, sign=sign)


def _mmnn_layer_path(model, layer: str) -> tuple[str, ...]:
  """Module path of an MMNN image-encoder layer name (``block_<i>`` or a module name)."""
  if layer.startswith("block_") and layer[6:].isdigit():
    blocks = tuple((model.image_kwargs or {}).get("block_config", (6, 12, 24, 16)))
    i = int(layer[6:])
    if not 1 <= i <= len(blocks):
      raise ValueError(f"layer {layer!r}: the image encoder has blocks "
                       f"block_1..block_{len(blocks)}")
    # A dense block's output is its last dense layer's output.
    return ("image_encoder", f"block{i}_layer{blocks[i - 1]}")
  path = _module_path(layer)
  return path if path[0] == "image_encoder" else ("image_encoder",) + path


def mmnn_grad_cam(model, variables: Mapping[str, Any], image: jax.Array, clinical: jax.Array,
                  *, layer: str = LAST_DENSE_BLOCK, head: str = "mm",
                  sign: str = "increasing") -> GradCAM:
  """Grad-CAM of an MMNN's log-hazards with respect to an image-encoder layer.

  Args:
    model: ``jaxsurv.models.MMNN`` with an image branch (built as in training;
      ``perturb_last_block`` is switched on here when needed).
    variables: ``{"params": ..., "batch_stats": ...}`` of the trained model.
    image: ``[batch, D, H, W, channels]`` preprocessed volumes.
    clinical: ``[batch, features]`` clinical features (ignored by an
      image-only model).
    layer: ``"last_dense_block"`` (default: the last dense block's output,
      before norm5), ``"block_<i>"`` (dense block i's output), or a module
      path inside the image encoder (e.g. ``"norm5"``, ``"transition1_conv"``).
    head: ``"mm"`` (the multimodal head, the model's prediction; for an
      image-only model it is the image head) or ``"image"`` (the image-only
      head of a multimodal model).
    sign: ``"increasing"`` (default: what raises the log-hazard) or
      ``"decreasing"`` (what lowers it); see the module docstring.

  Returns:
    ``GradCAM`` with maps ``[batch, n_outcomes, D, H, W]``, evaluated in eval
    mode (BatchNorm running statistics, no dropout).

  Raises:
    ValueError: the model has no image branch, unknown head, layer or sign.
  """
  _check_sign(sign)
  mods = tuple(model.modalities)
  if "image" not in mods:
    raise ValueError(f"Grad-CAM needs an image branch; this MMNN has modalities {mods}")
  heads = ("mm",) + (mods if len(mods) > 1 else ())
  if head not in heads:
    raise ValueError(f"head: {head!r} is not an output of this model; available: {list(heads)}")
  spatial = tuple(image.shape[1:4])
  select = lambda out: out[0][head].astype(jnp.float32)
  base = {k: v for k, v in variables.items() if k != _PERTURBATIONS}
  if layer != LAST_DENSE_BLOCK:
    return layer_grad_cam(model, base, image, clinical, layer=_mmnn_layer_path(model, layer),
                          input_spatial=spatial, score_fn=select, sign=sign, train=False)

  kwargs = dict(model.image_kwargs or {})
  kwargs["perturb_last_block"] = True
  hooked = model.clone(image_kwargs=kwargs)
  shape = jax.eval_shape(lambda: model.apply(base, image, clinical, train=False))[1]
  shape = shape["image"][LAST_DENSE_BLOCK]

  def run(delta):
    out = hooked.apply({**base, _PERTURBATIONS: {"image_encoder": {LAST_DENSE_BLOCK: delta}}},
                       image, clinical, train=False)
    return select(out), out[1]["image"][LAST_DENSE_BLOCK]

  scores, acts, grads = _per_outcome_gradients(run, jnp.zeros(shape.shape, shape.dtype))
  return grad_cam_from_gradients(acts, grads, spatial, scores, sign=sign)


# ----------------------------------------------------------------------------
# Writing: NIfTI on the original scan, PNG overlays.
# ----------------------------------------------------------------------------


def save_heatmap_nifti(cam: np.ndarray, case, path: PathLike):
  """Maps a grid-space map back onto the original scan and writes it as NIfTI.

  Args:
    cam: ``[D, H, W]`` map on the preprocessing grid (e.g. ``GradCAM.cam[b, k]``).
    case: the patient's ``jaxsurv.data.mri.PreprocessedCase``.
    path: output file (``.nii.gz`` or ``.nii``).

  Returns:
    The ``SimpleITK.Image`` written: float32 on the first channel's original
    grid (size, origin, spacing, direction), trilinear, 0 outside the crop.
    SimpleITK writes that geometry as the NIfTI qform and sform, so the map
    overlays the original scan in any viewer.

  Raises:
    ValueError: if ``cam`` is not on the case's grid.
  """
  import SimpleITK as sitk  # pylint: disable=import-outside-toplevel
  img = case.to_original_space(np.asarray(cam, np.float32), interpolation="linear",
                               default_value=0.0)
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  sitk.WriteImage(img, str(path), True)
  return img


def _tumour_centre(mask_arr: np.ndarray, heat_arr: np.ndarray) -> tuple[int, int, int]:
  """Voxel ``(k, j, i)`` at the mask's centroid (the heat map's maximum without a mask)."""
  nz = np.argwhere(mask_arr > 0)
  if len(nz):
    return tuple(int(v) for v in np.round(nz.mean(0)))
  return tuple(int(v) for v in np.unravel_index(np.argmax(heat_arr), heat_arr.shape))


def save_overlay_png(image, heat, path: PathLike, *, mask=None, title: str = "",
                     threshold: float = 0.05) -> pathlib.Path:
  """Draws the heat map over the scan: three orthogonal slices through the tumour centre.

  All images are reoriented to LPS first (``SimpleITK.DICOMOrient``), so the
  panels follow radiological convention: axial (patient right on the left,
  anterior up), coronal and sagittal (superior up; sagittal anterior on the
  left), each with its physical aspect ratio. Slices go through the tumour
  mask's centroid (the heat map's maximum when no mask is given). The scan is
  windowed to its 1st-99th percentile in each slice; heat below
  ``threshold`` is transparent; the mask's outline is drawn in white.

  Args:
    image: ``SimpleITK.Image`` scan (e.g. the first channel as read).
    heat: ``SimpleITK.Image`` map on the same grid, values in [0, 1].
    path: PNG file to write.
    mask: optional ``SimpleITK.Image`` tumour mask on the same grid.
    title: figure title.
    threshold: heat values below it are not drawn.

  Returns:
    The PNG path.

  Raises:
    ValueError: if the images do not share a grid size.
  """
  # pylint: disable=import-outside-toplevel
  import SimpleITK as sitk
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  imgs = {"image": image, "heat": heat}
  if mask is not None:
    imgs["mask"] = mask
  sizes = {k: tuple(v.GetSize()) for k, v in imgs.items()}
  if len(set(sizes.values())) != 1:
    raise ValueError(f"save_overlay_png: images must share one grid, got sizes {sizes}")
  arrs = {k: sitk.GetArrayFromImage(sitk.DICOMOrient(v, "LPS")).astype(np.float32)
          for k, v in imgs.items()}  # [k, j, i]: k -> S, j -> P, i -> L.
  sp_i, sp_j, sp_k = sitk.DICOMOrient(image, "LPS").GetSpacing()
  kc, jc, ic = _tumour_centre(arrs.get("mask", np.zeros(0)), arrs["heat"])
  views = [("axial", (kc, slice(None), slice(None)), sp_j / sp_i, "upper"),
           ("coronal", (slice(None), jc, slice(None)), sp_k / sp_i, "lower"),
           ("sagittal", (slice(None), slice(None), ic), sp_k / sp_j, "lower")]
  fig = Figure(figsize=(12, 4.4))
  FigureCanvasAgg(fig)
  axes = fig.subplots(1, 3)
  shown = None
  for ax, (name, sl, aspect, origin) in zip(axes, views):
    scan = arrs["image"][sl]
    lo, hi = np.percentile(scan, [1, 99]) if scan.size else (0.0, 1.0)
    ax.imshow(scan, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1, aspect=aspect,
              origin=origin, interpolation="nearest")
    h = arrs["heat"][sl]
    shown = ax.imshow(np.ma.masked_less(h, threshold), cmap="jet", vmin=0.0, vmax=1.0, alpha=0.5,
                      aspect=aspect, origin=origin, interpolation="nearest")
    if "mask" in arrs and np.any(arrs["mask"][sl] > 0):
      # No ``origin``: row r sits at y = r, as in imshow with either origin.
      ax.contour((arrs["mask"][sl] > 0).astype(np.float32), levels=[0.5], colors="white",
                 linewidths=0.8)
    ax.set_title(name)
    ax.set_axis_off()
  fig.colorbar(shown, ax=list(axes), fraction=0.02, pad=0.01, label="Grad-CAM (normalised)")
  if title:
    fig.suptitle(title)
  from jaxsurv import io as io_lib  # pylint: disable=import-outside-toplevel
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  io_lib.save_png_atomic(fig, path)
  return path
