"""What the two demo cohorts share: manifest layout, random streams, rendering and writing.

* The demo manifest layout: :data:`MANIFEST_NAME`, the image, mask and
  outcome columns, and the oracle, latent and render-reference columns that
  are never model inputs.
* Per-patient random streams: every random draw uses
  ``np.random.default_rng`` seeded by ``(seed, cohort, patient, stream)``
  (``_patient_rng``), so a subset of patients gets byte-identical files and
  the same outcomes as in the full cohort.
* Rendering helpers (volume geometry in mm, Gaussian random fields, the
  simulated acquisition with partial-volume blur, bias field, per-site gain
  and Rician noise) and :class:`PhantomVolumes`, one rendered patient, with
  the tissue codes of :data:`TISSUE_LABELS`.
* Writers: NIfTI files per patient and an atomically written ``manifest.csv``.

Volumes are stored as ``[x, y, z]`` arrays (NIfTI ``i, j, k`` order; ``z`` is
the thick-slice axis), ``int16`` intensities in arbitrary scanner units and a
``uint8`` tumour mask, with an affine whose diagonal is the voxel spacing in
mm.

The cohorts themselves are ``jaxsurv.data.sarcoma_phantom`` and
``jaxsurv.data.rotterdam_rendered``; ``jaxsurv.data.phantom`` gathers their
public names.
"""

from __future__ import annotations

import os
import pathlib
import tempfile
import zlib
from typing import NamedTuple

import nibabel as nib
import numpy as np
import pandas as pd
import scipy.fft
import scipy.ndimage

MANIFEST_NAME = "manifest.csv"
IMAGE_COLUMNS = ("t1c", "t2fs")
MASK_COLUMN = "mask"
OUTCOME_COLUMNS = ("os_time", "os_event", "dm_time", "dm_event")
ORACLE_COLUMNS = ("eta_os", "eta_dm")
# Generator variables of the sarcoma phantom: the truth behind the images and
# the hazard. Never model inputs.
LATENT_PREFIX = "latent_"
# Rotterdam's recorded size band and grade, and the diameter drawn from them:
# kept for reference (they are what the image shows), never model inputs.
REFERENCE_COLUMNS = ("render_size", "render_grade", "render_diameter_mm")

# Tissue codes of the label map returned with every rendered patient.
TISSUE_LABELS = {
    0: "air/background", 1: "fat", 2: "muscle", 3: "cortical bone",
    4: "fatty marrow", 5: "viable tumour", 6: "necrotic core", 7: "oedema",
    8: "fibroglandular tissue", 9: "chest wall", 10: "skin", 11: "cyst",
}


# ---------------------------------------------------------------------------
# Random streams, checks, geometry, rendering, writing
# ---------------------------------------------------------------------------

# Distinct tags keep the two cohorts' random streams apart for equal seeds.
_SARCOMA_TAG = 1
_ROTTERDAM_TAG = 2
# Per patient: stream 0 = table (latents, clinical, outcomes), 1 = rendering.
_TABLE_STREAM = 0
_RENDER_STREAM = 1


def _patient_rng(seed: int, tag: int, key: int, stream: int) -> np.random.Generator:
  """A generator that depends only on (seed, cohort tag, patient key, stream)."""
  return np.random.default_rng([seed, tag, key, stream])


def _patient_key(patient_id: str) -> int:
  """A stable non-negative integer key for a patient id (CRC-32 of its text)."""
  return zlib.crc32(str(patient_id).encode("utf-8"))


def _check_seed(seed) -> int:
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
    raise ValueError(f"seed: expected a non-negative int, got {seed!r}")
  return int(seed)


def _check_n(n, name: str = "n_patients") -> int:
  if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
    raise ValueError(f"{name}: expected a positive int, got {n!r}")
  return int(n)


def _check_geometry(shape, spacing_mm, min_fov_mm) -> tuple[tuple[int, ...], np.ndarray]:
  """Validates a volume shape and voxel spacing against a minimum field of view."""
  try:
    shape = tuple(int(s) for s in shape)
    spacing = np.asarray(spacing_mm, dtype=np.float64).reshape(-1)
  except (TypeError, ValueError) as e:
    raise ValueError(f"shape/spacing_mm: expected 3 numbers each: {e}") from e
  if len(shape) != 3 or min(shape) < 4:
    raise ValueError(f"shape: expected 3 ints >= 4 ([x, y, z] voxels), got {shape}")
  if spacing.shape != (3,) or not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
    raise ValueError(f"spacing_mm: expected 3 positive finite mm values, got {spacing_mm}")
  fov = np.asarray(shape) * spacing
  if np.any(fov < np.asarray(min_fov_mm)):
    raise ValueError(
        f"shape x spacing_mm gives a field of view of {fov.round(1).tolist()} mm; "
        f"the anatomy is drawn in mm and needs at least {list(min_fov_mm)} mm "
        "(use fewer, larger voxels for a smaller array)")
  return shape, spacing


def _grid(shape, spacing):
  """Voxel-centre coordinates in mm, centred on the volume, as broadcastable axes."""
  return tuple(
      ((np.arange(n, dtype=np.float32) - (n - 1) / 2) * s).reshape(
          [-1 if a == i else 1 for a in range(3)])
      for i, (n, s) in enumerate(zip(shape, spacing)))


def _smooth_fields(rng, shape, spacing, widths_mm) -> np.ndarray:
  """Unit-variance Gaussian random fields with Gaussian kernels of given widths.

  Equivalent to filtering white noise with a Gaussian kernel of standard
  deviation ``width`` mm (per field): the half-spectrum is drawn as complex
  white noise times the kernel's transfer function ``exp(-2 pi^2 w^2 f^2)``
  and transformed back. Only frequencies where the transfer function exceeds
  1e-3 are drawn, which makes smooth fields cheap. Widths are physical (mm),
  so the texture does not depend on the anisotropic voxel spacing. The
  fields are periodic over the volume, which is harmless here. Each field
  draws from its own child generator (``rng.spawn``), so a field's width does
  not shift the random numbers of the others.

  Returns:
    ``[len(widths_mm), x, y, z]`` float32, each field zero-mean, unit-variance.
  """
  fx = np.fft.fftfreq(shape[0], d=spacing[0]).astype(np.float32).reshape(-1, 1, 1)
  fy = np.fft.fftfreq(shape[1], d=spacing[1]).astype(np.float32).reshape(1, -1, 1)
  fz = np.fft.rfftfreq(shape[2], d=spacing[2]).astype(np.float32).reshape(1, 1, -1)
  f2 = fx * fx + fy * fy + fz * fz
  spec = np.zeros((len(widths_mm),) + f2.shape, np.complex64)
  for i, (w, child) in enumerate(zip(widths_mm, rng.spawn(len(widths_mm)))):
    filt = np.exp(np.float32(-2.0 * np.pi ** 2 * w * w) * f2)
    filt[0, 0, 0] = 0.0                      # zero mean
    keep = filt > 1e-3
    m = int(keep.sum())
    noise = child.standard_normal((2, m), dtype=np.float32)
    spec[i][keep] = (noise[0] + 1j * noise[1]) * filt[keep]
  out = scipy.fft.irfftn(spec, s=shape, axes=(1, 2, 3)).astype(np.float32, copy=False)
  out /= out.std(axis=(1, 2, 3), keepdims=True) + np.float32(1e-12)
  return out


def _bias_field(rng, grids, fov, amplitude: float) -> np.ndarray:
  """A smooth multiplicative coil-sensitivity field, exp(quadratic polynomial).

  ``amplitude`` is the standard deviation of each coefficient on coordinates
  normalised to [-1, 1]; 0.1 gives roughly +-20% across the field of view.
  The polynomial has no in-plane x slice cross terms, so the field is the
  product of an in-plane and a through-slice factor (cheap to evaluate).
  Returns a broadcastable ``[x, y, z]`` float32 array.
  """
  x, y, z = (g / np.float32(f / 2) for g, f in zip(grids, fov))
  c = rng.normal(0.0, amplitude, size=7).astype(np.float32)
  log_xy = c[0] * x + c[1] * y + c[3] * x * x + c[4] * y * y + c[5] * x * y
  log_z = c[2] * z + c[6] * z * z
  return np.exp(log_xy - log_xy.mean()) * np.exp(log_z - log_z.mean())


def _acquire(rng, clean: np.ndarray, grids, fov, *, bias_amplitude: float,
             noise_sd: float, gain) -> np.ndarray:
  """Simulates acquisition of a noiseless 2-channel image ``[2, x, y, z]``.

  Order: partial-volume blur (a Gaussian point-spread function of about one
  voxel FWHM along each axis, so wider in mm along the thick-slice axis), a
  smooth multiplicative bias field per channel, a per-channel gain (site /
  scanner scaling), then Rician noise (magnitude of a complex signal with
  Gaussian noise of standard deviation ``noise_sd`` x gain in each of the
  real and imaginary parts). Returns int16 ``[2, x, y, z]`` in units of
  1/1000 of the nominal fat T1 intensity.
  """
  out = np.empty(clean.shape, np.int16)
  for ch in range(clean.shape[0]):
    # sigma 0.42 voxel (FWHM ~1 voxel); truncate 2.5 keeps a 3-tap kernel, the
    # next tap would weigh < 1e-5.
    img = scipy.ndimage.gaussian_filter(clean[ch], sigma=0.42, mode="nearest", truncate=2.5)
    img = img * _bias_field(rng, grids, fov, bias_amplitude) * np.float32(gain[ch])
    sd = np.float32(noise_sd * gain[ch])
    re = img + sd * rng.standard_normal(img.shape, dtype=np.float32)
    im = sd * rng.standard_normal(img.shape, dtype=np.float32)
    mag = np.sqrt(re * re + im * im)
    out[ch] = np.clip(np.rint(mag * 1000.0), 0, np.iinfo(np.int16).max).astype(np.int16)
  return out


def _ellipsoid_radius(dx, dy, dz, axes, theta):
  """Normalised ellipsoid radius (1 on the surface) for an in-plane rotation."""
  ct, st = np.float32(np.cos(theta)), np.float32(np.sin(theta))
  u = dx * ct + dy * st
  v = -dx * st + dy * ct
  a, b, c = (np.float32(s) for s in axes)
  return np.sqrt((u / a) ** 2 + (v / b) ** 2 + (dz / c) ** 2)


class PhantomVolumes(NamedTuple):
  """One rendered patient, all arrays ``[x, y, z]`` (NIfTI i, j, k order).

  Attributes:
    t1c: int16 T1 post-contrast intensities (arbitrary units).
    t2fs: int16 T2 fat-suppressed intensities (arbitrary units).
    mask: uint8 tumour mask (1 = tumour, including its necrotic core; oedema
      excluded), drawn on the voxel grid before partial-volume blur.
    tissue: uint8 tissue label map (codes in :data:`TISSUE_LABELS`); for tests
      and inspection, not written to disk.
    affine: float64 ``[4, 4]`` voxel-to-world (mm) affine; its diagonal is the
      voxel spacing.
  """
  t1c: np.ndarray
  t2fs: np.ndarray
  mask: np.ndarray
  tissue: np.ndarray
  affine: np.ndarray


def _affine(shape, spacing, origin_shift) -> np.ndarray:
  aff = np.diag(list(spacing) + [1.0])
  centre = (np.asarray(shape) - 1) / 2 * spacing
  aff[:3, 3] = -centre + np.asarray(origin_shift)
  return aff


def _save_nifti(array: np.ndarray, affine: np.ndarray, path: pathlib.Path) -> None:
  img = nib.Nifti1Image(array, affine)
  img.header.set_xyzt_units("mm")
  img.set_qform(affine, code=1)
  img.set_sform(affine, code=1)
  nib.save(img, str(path))


def _safe_name(patient_id: str) -> str:
  keep = "".join(c if (c.isalnum() or c in "-_.") else "_" for c in str(patient_id))
  if not keep or keep.startswith("."):
    keep = "p" + keep
  return keep


def _write_patient(vol: PhantomVolumes, images_dir: pathlib.Path, patient_id: str):
  """Writes the three NIfTI files; returns their paths relative to the manifest."""
  stem = _safe_name(patient_id)
  rel = {}
  for col, arr in (("t1c", vol.t1c), ("t2fs", vol.t2fs), ("mask", vol.mask)):
    name = f"{stem}_{col}.nii.gz"
    _save_nifti(arr, vol.affine, images_dir / name)
    rel[col] = f"{images_dir.name}/{name}"
  return rel


def _write_manifest(table: pd.DataFrame, out_dir: pathlib.Path) -> pathlib.Path:
  """Writes ``manifest.csv`` atomically (so a manifest implies complete files)."""
  path = out_dir / MANIFEST_NAME
  fd, tmp = tempfile.mkstemp(prefix=".manifest.", suffix=".csv", dir=out_dir)
  os.close(fd)
  try:
    table.to_csv(tmp, index=False, float_format="%.6g")
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return path


def _progress(iterable, total: int, enabled: bool, desc: str):
  if not enabled:
    return iterable
  from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
  return tqdm(iterable, total=total, desc=desc)
