"""MRI preprocessing for the image branch: tumour-centred crops on a fixed grid.

One case = one or more co-registered channels (MMNN: T1 post-contrast and T2
fat-sat) plus a tumour mask drawn on the first channel. ``preprocess_case``
turns it into a float32 ``[depth, height, width, channels]`` array:

1. Read every file with SimpleITK, after a cheap integrity screen
   (``check_image_file``): ITK's NIfTI reader silently zero-fills truncated
   files, so truncation is caught here, not by the reader.
2. Check that the mask lies on the first channel's grid (and, by default, that
   every channel does too) within ``geometry_tol_mm``; check the mask is not
   empty.
3. Optional N4 bias-field correction per channel on its native grid
   (SimpleITK ``N4BiasFieldCorrectionImageFilter`` on a shrunk copy; the bias
   field is then evaluated at full resolution). Tustison et al., IEEE TMI 2010.
4. Canonical orientation: the first channel and the mask are reoriented with
   ``DICOMOrient`` to ``cfg.orientation`` (default ``"LPS"``, SimpleITK's own
   world frame, so a non-oblique scan ends with an identity direction). The
   output array axes are then ``[D, H, W] = [k, j, i]``: with "LPS", D runs
   towards Superior, H towards Posterior and W towards patient Left.
5. Region of interest: the mask's bounding box plus ``margin_mm`` on each side
   (optionally widened so that all axes share one scale, ``keep_aspect``, or a
   fixed field of view ``fov_mm`` centred on the tumour).
6. Every channel is resampled into that box on an isotropic ``spacing_mm``
   grid defined in the first channel's (reoriented) frame. This is the same as
   resampling T2 onto T1's physical grid and then cropping, but interpolates
   each channel once instead of twice. The mask uses nearest neighbour.
7. Optional masking to tumour plus periphery (the MMNN image branch multiplies
   the image by the tumour mask, DigITs-AIML/MMNN_STS ``data/ImageDatasets.py``;
   its paper's Methods keep "the tumor volume and immediate perilesional
   area"; here the mask can be dilated by ``periphery_mm`` millimetres,
   measured with a Maurer distance map).
8. Resize to ``cfg.grid`` (Gaussian anti-aliasing when shrinking, as in
   scikit-image ``resize(anti_aliasing=True)``: sigma = (factor - 1) / 2 input
   voxels), then per-channel z-score over the tumour-mask voxels.

The returned ``PreprocessedCase`` carries the grid's geometry so that any
grid-space array (e.g. a Grad-CAM heat map) can be put back on the original
image's grid with ``to_original_space``.

All physical coordinates follow ITK: millimetres in the LPS world frame,
direction matrices row-major with columns = axis directions, sizes and
indices in ``(x, y, z) = (i, j, k)`` order. NumPy arrays are ``[k, j, i]``.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import os
import pathlib
import struct
import tarfile
import zlib
from typing import Sequence

import numpy as np
import SimpleITK as sitk

PathLike = str | os.PathLike

# Bump when a code change alters preprocessing output for unchanged settings,
# so that fingerprints (and the prepared datasets they version) change too.
_PIPELINE_VERSION = 3  # 2: tiny tumours' z-score from the isotropic stage; 3: sub-voxel masks.

_INTERPOLATORS = {
    "nearest": sitk.sitkNearestNeighbor,
    "linear": sitk.sitkLinear,
    "bspline": sitk.sitkBSpline,
    "lanczos": sitk.sitkLanczosWindowedSinc,
}


class ImageFileError(ValueError):
  """A medical image file is missing, unreadable or corrupt (names the file)."""

  def __init__(self, path: PathLike, message: str):
    self.path = str(path)
    self.reason = message
    super().__init__(f"{self.path}: {message}")

  def __reduce__(self):  # Picklable, so errors survive worker processes.
    return (type(self), (self.path, self.reason))


class GeometryMismatchError(ValueError):
  """Two images that must share a grid (channels, mask) do not."""


class EmptyMaskError(ValueError):
  """A tumour mask has no foreground voxel (names the file)."""


# --------------------------------------------------------------------------
# Geometry.


@dataclasses.dataclass(frozen=True)
class Geometry:
  """A 3-D image grid in ITK conventions.

  Attributes:
    size: voxels along ``(i, j, k)``.
    origin: physical position (mm, LPS) of the centre of voxel ``(0, 0, 0)``.
    spacing: voxel size in mm along ``(i, j, k)``.
    direction: 3x3 direction cosines, row-major (columns = axis directions).
  """
  size: tuple[int, int, int]
  origin: tuple[float, float, float]
  spacing: tuple[float, float, float]
  direction: tuple[float, ...]

  @classmethod
  def of(cls, obj) -> "Geometry":
    """From a ``sitk.Image`` or a ``sitk.ImageFileReader`` after ReadImageInformation."""
    return cls(tuple(int(v) for v in obj.GetSize()),
               tuple(float(v) for v in obj.GetOrigin()),
               tuple(float(v) for v in obj.GetSpacing()),
               tuple(float(v) for v in obj.GetDirection()))

  @property
  def matrix(self) -> np.ndarray:
    """``[3, 3]`` direction matrix (columns = axis directions)."""
    return np.asarray(self.direction, np.float64).reshape(3, 3)

  def index_to_physical(self, index) -> np.ndarray:
    """Maps continuous indices ``[..., 3]`` (i, j, k) to physical points ``[..., 3]`` (mm)."""
    idx = np.asarray(index, np.float64)
    return np.asarray(self.origin) + (idx * np.asarray(self.spacing)) @ self.matrix.T

  def corners(self) -> np.ndarray:
    """Physical centres (mm) of the 8 corner voxels, ``[8, 3]``."""
    hi = np.asarray(self.size, np.float64) - 1
    idx = np.array([[a, b, c] for a in (0, hi[0]) for b in (0, hi[1]) for c in (0, hi[2])])
    return self.index_to_physical(idx)

  def apply_to(self, img: sitk.Image) -> sitk.Image:
    """Sets this geometry's origin, spacing and direction on ``img`` (in place)."""
    img.SetOrigin(self.origin)
    img.SetSpacing(self.spacing)
    img.SetDirection(self.direction)
    return img


def geometry_mismatch_mm(a: Geometry, b: Geometry) -> float:
  """Largest physical distance (mm) between corresponding corner voxels of two grids.

  One number that covers origin, spacing and direction differences in
  physical units: two grids "share physical space within tol" iff they have
  the same size and this is <= tol.

  Raises:
    ValueError: if the sizes differ (corners do not correspond).
  """
  if tuple(a.size) != tuple(b.size):
    raise ValueError(f"grid sizes differ: {a.size} vs {b.size}")
  return float(np.max(np.linalg.norm(a.corners() - b.corners(), axis=-1)))


# --------------------------------------------------------------------------
# Reading and integrity checks.


@dataclasses.dataclass(frozen=True)
class ImageInfo:
  """Header facts of an image file, read without loading the voxels."""
  path: str
  geometry: Geometry | None  # None unless the image is 3-D.
  size: tuple[int, ...]  # Voxels per axis, (i, j, k[, ...]).
  dimension: int
  components: int
  pixel_type: str


def read_image_info(path: PathLike) -> ImageInfo:
  """Reads an image header (NIfTI, NRRD, MHA, ...) with SimpleITK, not the voxels.

  Raises:
    ImageFileError: if the file is missing or its header cannot be read.
  """
  path = str(path)
  if not os.path.isfile(path):
    raise ImageFileError(path, "file not found")
  reader = sitk.ImageFileReader()
  reader.SetFileName(path)
  try:
    reader.ReadImageInformation()
  except RuntimeError as e:
    raise ImageFileError(path, f"unreadable image header ({_sitk_reason(e)})") from None
  dim = reader.GetDimension()
  geom = Geometry.of(reader) if dim == 3 else None
  return ImageInfo(path, geom, tuple(int(v) for v in reader.GetSize()), dim, reader.GetNumberOfComponents(),
                   sitk.GetPixelIDValueAsString(reader.GetPixelID()))


def _sitk_reason(err: Exception) -> str:
  """The useful last line of a SimpleITK exception message."""
  lines = [l.strip() for l in str(err).strip().splitlines() if l.strip()]
  return lines[-1] if lines else type(err).__name__


def _gzip_isize(path: str, offset: int = 0) -> int | None:
  """ISIZE (uncompressed length mod 2**32) from the trailer of a gzip stream
  that starts at ``offset`` and ends the file; None if no gzip stream starts there."""
  with open(path, "rb") as f:
    f.seek(offset)
    if f.read(2) != b"\x1f\x8b":
      return None
    f.seek(-4, os.SEEK_END)
    return struct.unpack("<I", f.read(4))[0]


def _gzip_stream_length(path: str, skip: int = 0) -> int:
  """Decompresses a gzip stream fully (CRC checked) and returns its length."""
  n = 0
  with open(path, "rb") as raw:
    raw.seek(skip)
    with gzip.GzipFile(fileobj=raw) as f:
      while chunk := f.read(1 << 22):
        n += len(chunk)
  return n


def _nifti_layout(path: str) -> tuple[int, int, bool]:
  """``(data offset, data bytes, gzipped)`` of a NIfTI file, from nibabel's header."""
  import nibabel as nib  # Local import: nibabel is only needed for NIfTI files.
  img = nib.load(path)
  hdr = img.header
  nbytes = int(np.prod(hdr.get_data_shape(), dtype=np.int64)) * hdr.get_data_dtype().itemsize
  return int(img.dataobj.offset), nbytes, path.endswith(".gz")


def _nrrd_layout(path: str) -> tuple[int, str] | None:
  """``(header length, encoding)`` of an NRRD with attached data, else None."""
  with open(path, "rb") as f:
    head = f.read(1 << 16)
  if not head.startswith(b"NRRD"):
    return None
  end = head.find(b"\n\n")
  if end < 0:
    return None
  fields = {}
  for line in head[:end].decode("latin-1").splitlines()[1:]:
    if ":" in line and not line.startswith("#"):
      key, _, value = line.partition(":")
      fields[key.strip().lower()] = value.lstrip("=").strip()
  if "data file" in fields or "datafile" in fields:
    return None  # Detached data: screened by a full read.
  return end + 2, fields.get("encoding", "raw").lower()


def check_image_file(path: PathLike, *, full: bool = False, info: ImageInfo | None = None) -> None:
  """Checks that an image file's voxel data is complete, at a chosen cost.

  Cost trade-off (why this exists): SimpleITK's NIfTI reader silently
  zero-fills a truncated file, so a truncated ``.nii.gz`` would pass a plain
  read. The default screen is O(1) per file:
    * gzip (``.nii.gz``, NRRD ``encoding: gzip``): the gzip trailer's ISIZE must
      equal the expected uncompressed length (header + voxels) mod 2**32; a
      truncated file ends with arbitrary compressed bytes instead.
    * uncompressed (``.nii``, NRRD ``raw``): the file must be long enough.
  When the screen fails (or the layout is unknown, e.g. multi-member gzip,
  detached NRRD data, other formats) the data is decompressed or read in full
  before anything is reported. ``full=True`` always decompresses the stream
  (gzip CRC and length checked) or reads the image: this also catches
  corruption in the middle of a file, at the cost of one decompression.

  Args:
    path: image file.
    full: always read all voxel data.
    info: header information if already read (saves one header read).

  Raises:
    ImageFileError: naming the file, if it is missing, unreadable, truncated
      or corrupt.
  """
  path = str(path)
  info = info or read_image_info(path)
  lower = path.lower()
  try:
    if lower.endswith((".nii", ".nii.gz")):
      offset, nbytes, gz = _nifti_layout(path)
      expected = offset + nbytes
      if gz:
        if not full and _gzip_isize(path) == expected % (1 << 32):
          return
        got = _gzip_stream_length(path)
      else:
        got = os.path.getsize(path)
      if got < expected:
        raise ImageFileError(path, f"truncated: {got} of {expected} bytes of voxel data present")
      return
    if lower.endswith((".nrrd", ".nhdr")):
      nbytes = int(np.prod(info.size)) * max(info.components, 1) * _pixel_bytes(info)
      layout = _nrrd_layout(path)
      if layout is not None and layout[1] in ("raw", "gzip", "gz"):
        header, enc = layout
        if enc == "raw":
          got = os.path.getsize(path) - header
        else:
          if not full and _gzip_isize(path, header) == nbytes % (1 << 32):
            return
          got = _gzip_stream_length(path, skip=header)
        if got < nbytes:
          raise ImageFileError(path, f"truncated: {got} of {nbytes} bytes of voxel data present")
        return
  except ImageFileError:
    raise
  except (OSError, EOFError, ValueError, struct.error, zlib.error) as e:  # BadGzipFile is an OSError.
    raise ImageFileError(path, f"corrupt or truncated data ({type(e).__name__}: {e})") from None
  # Unknown layout: let ITK read the voxels (its NRRD/MetaImage readers fail on short data).
  try:
    sitk.ReadImage(path)
  except RuntimeError as e:
    raise ImageFileError(path, f"corrupt or truncated data ({_sitk_reason(e)})") from None


def _pixel_bytes(info: ImageInfo) -> int:
  """Bytes per pixel component from a SimpleITK pixel-type string."""
  name = info.pixel_type.lower()
  for key, size in (("64-bit", 8), ("32-bit", 4), ("16-bit", 2), ("8-bit", 1), ("double", 8),
                    ("float", 4)):
    if key in name:
      return size
  return 1


def read_image(path: PathLike, *, pixel_type=sitk.sitkFloat32, check: bool = True,
               full_check: bool = False) -> sitk.Image:
  """Reads a 3-D scalar image with SimpleITK after the integrity screen.

  Args:
    path: NIfTI (``.nii``/``.nii.gz``), NRRD or any format ITK reads.
    pixel_type: SimpleITK pixel type to cast to (default float32).
    check: run ``check_image_file`` first (cheap; catches truncation that ITK's
      NIfTI reader would zero-fill).
    full_check: make that check decompress the whole file (also catches
      corruption mid-file, which ITK's NIfTI reader would pass on as garbage).

  Returns:
    The image, ``size = (i, j, k)``.

  Raises:
    ImageFileError: missing, unreadable, corrupt, not 3-D or not scalar.
  """
  path = str(path)
  info = read_image_info(path)
  if info.dimension != 3 or info.components != 1:
    raise ImageFileError(path, f"expected a 3-D scalar volume, got a {info.dimension}-D image "
                         f"with {info.components} component(s) per voxel")
  if check:
    check_image_file(path, info=info, full=full_check)
  try:
    return sitk.ReadImage(path, pixel_type)
  except RuntimeError as e:
    raise ImageFileError(path, f"unreadable image ({_sitk_reason(e)})") from None


# --------------------------------------------------------------------------
# Configuration.


# Below this many tumour voxels on the output grid, z-score statistics come
# from the isotropic intermediate resampling instead (see preprocess_case).
_MIN_ZSCORE_VOXELS = 27


@dataclasses.dataclass(frozen=True)
class PreprocessConfig:
  """Settings of ``preprocess_case``; ``fingerprint()`` versions prepared datasets.

  Attributes:
    spacing_mm: isotropic voxel size (mm) of the intermediate resampling.
    grid: output shape ``(depth, height, width)`` in voxels, e.g. (64, 64, 64).
    margin_mm: margin (mm) added on every side of the mask's bounding box.
    keep_aspect: widen the box so that all axes share one scale (a sphere stays
      a sphere in the grid); False stretches each axis independently (as MMNN's
      resize to 64^3 does).
    fov_mm: if set, a fixed physical box (mm; scalar or ``(D, H, W)``) centred
      on the mask's bounding box replaces bounding box + margin, so that tumour
      size stays visible in the grid.
    mask_to_periphery: zero everything outside the tumour dilated by
      ``periphery_mm`` (after z-scoring, so 0 = the tumour's mean intensity).
    periphery_mm: dilation (mm) of the tumour mask; 0 = tumour only (MMNN).
    n4: run N4 bias-field correction on each channel first.
    n4_shrink: in-plane shrink factor for N4 (slice axis shrunk so the shrunk
      voxels stay roughly isotropic).
    n4_iterations: iterations per fitting level (length = number of levels).
    n4_convergence: N4 convergence threshold.
    n4_control_points: B-spline control points per axis at the first level.
    zscore: per-channel z-score over the tumour-mask voxels of the output
      (over the finer isotropic stage when the tumour covers fewer than 27
      output voxels, so tiny tumours still get stable statistics).
    interpolation: image interpolator: nearest, linear, bspline or lanczos.
    mask_interpolation: "nearest", or "linear" (linear, then >= 0.5).
    antialias: Gaussian smoothing before shrinking to the grid.
    orientation: DICOMOrient code of the output frame (default "LPS").
    pad_value: value outside the image's field of view; None = each channel's
      minimum.
    geometry_tol_mm: largest corner displacement (mm) for two grids to count
      as the same (see ``geometry_mismatch_mm``).
    require_same_grid: channels must share the first channel's grid (size and
      geometry within tolerance); if False they are resampled physically and
      must only cover the tumour.
  """
  spacing_mm: float = 1.0
  grid: tuple[int, int, int] = (64, 64, 64)
  margin_mm: float = 10.0
  keep_aspect: bool = True
  fov_mm: float | tuple[float, float, float] | None = None
  mask_to_periphery: bool = False
  periphery_mm: float = 10.0
  n4: bool = False
  n4_shrink: int = 4
  n4_iterations: tuple[int, ...] = (50, 50, 30)
  n4_convergence: float = 1e-3
  n4_control_points: int = 4
  zscore: bool = True
  interpolation: str = "linear"
  mask_interpolation: str = "nearest"
  antialias: bool = True
  orientation: str = "LPS"
  pad_value: float | None = None
  geometry_tol_mm: float = 0.5
  require_same_grid: bool = True

  def __post_init__(self):
    grid = (self.grid,) * 3 if isinstance(self.grid, (int, np.integer)) else tuple(self.grid)
    if len(grid) != 3 or any(int(g) != g or g < 1 for g in grid):
      raise ValueError(f"PreprocessConfig.grid: expected 3 positive ints (D, H, W), got {self.grid!r}")
    object.__setattr__(self, "grid", tuple(int(g) for g in grid))
    object.__setattr__(self, "n4_iterations", tuple(int(i) for i in self.n4_iterations))
    if self.fov_mm is not None:
      fov = (self.fov_mm,) * 3 if np.isscalar(self.fov_mm) else tuple(self.fov_mm)
      if len(fov) != 3 or any(not f > 0 for f in fov):
        raise ValueError(f"PreprocessConfig.fov_mm: expected positive mm (scalar or 3), got {self.fov_mm!r}")
      object.__setattr__(self, "fov_mm", tuple(float(f) for f in fov))
    for name in ("spacing_mm",):
      if not getattr(self, name) > 0:
        raise ValueError(f"PreprocessConfig.{name}: must be > 0 mm, got {getattr(self, name)!r}")
    for name in ("margin_mm", "periphery_mm", "geometry_tol_mm"):
      if not getattr(self, name) >= 0:
        raise ValueError(f"PreprocessConfig.{name}: must be >= 0 mm, got {getattr(self, name)!r}")
    if self.interpolation not in _INTERPOLATORS:
      raise ValueError(f"PreprocessConfig.interpolation: {self.interpolation!r} not in {sorted(_INTERPOLATORS)}")
    if self.mask_interpolation not in ("nearest", "linear"):
      raise ValueError(f"PreprocessConfig.mask_interpolation: {self.mask_interpolation!r} not in "
                       "['linear', 'nearest']")
    code = self.orientation.upper()
    if (len(code) != 3 or sorted({"R": "L", "A": "P", "S": "I"}.get(c, c) for c in code)
        != ["I", "L", "P"]):
      raise ValueError(f"PreprocessConfig.orientation: {self.orientation!r} is not a 3-letter "
                       "orientation code using each of R/L, A/P, S/I once")
    object.__setattr__(self, "orientation", code)
    if self.n4 and (self.n4_shrink < 1 or not self.n4_iterations):
      raise ValueError("PreprocessConfig: n4_shrink must be >= 1 and n4_iterations non-empty")

  def fingerprint(self) -> str:
    """A stable 16-hex-digit hash of every setting (and the pipeline version).

    Independent of Python, platform and field order; used to version prepared
    datasets, so any change of setting gives a different fingerprint.
    """
    payload = {"pipeline_version": _PIPELINE_VERSION, **dataclasses.asdict(self)}
    text = json.dumps(payload, sort_keys=True, default=list, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------
# Result.


@dataclasses.dataclass(frozen=True)
class PreprocessedCase:
  """One preprocessed case.

  Attributes:
    volume: float32 ``[D, H, W, C]`` (``cfg.grid`` + channels).
    mask: uint8 ``[D, H, W]`` tumour mask on the grid (1 = tumour).
    region: bool ``[D, H, W]`` tumour + periphery kept by
      ``mask_to_periphery``, else None.
    grid_geometry: geometry of the output grid (ITK order: size = (W, H, D)).
    original_geometry: the first channel's grid as stored in its file.
    channel_mean, channel_std: per-channel z-score statistics (intensity units
      after N4), or None when ``zscore`` is off.
    image_paths, mask_path: the source files.
    fingerprint: ``PreprocessConfig.fingerprint()`` of the settings used.
  """
  volume: np.ndarray
  mask: np.ndarray
  region: np.ndarray | None
  grid_geometry: Geometry
  original_geometry: Geometry
  channel_mean: tuple[float, ...] | None
  channel_std: tuple[float, ...] | None
  image_paths: tuple[str, ...]
  mask_path: str
  fingerprint: str

  @property
  def grid_origin(self) -> tuple[float, float, float]:
    return self.grid_geometry.origin

  @property
  def grid_spacing(self) -> tuple[float, float, float]:
    return self.grid_geometry.spacing

  @property
  def grid_direction(self) -> tuple[float, ...]:
    return self.grid_geometry.direction

  def grid_image(self, grid_array) -> sitk.Image:
    """Wraps a grid-space array ``[D, H, W]`` as a float32 ``sitk.Image`` with the grid's geometry."""
    return grid_image(grid_array, self.grid_geometry)

  def to_original_space(self, grid_array, *, interpolation: str = "linear",
                        default_value: float = 0.0) -> sitk.Image:
    """Resamples a grid-space map back onto the first channel's original grid.

    Used for Grad-CAM heat maps: ``sitk.WriteImage(case.to_original_space(cam),
    "cam.nii.gz")`` overlays on the original T1 file in any viewer. Same as
    ``grid_to_original(grid_array, case.grid_geometry, case.original_geometry)``.

    Args:
      grid_array: ``[D, H, W]`` (or ``[D, H, W, 1]``) values on the output grid.
      interpolation: nearest, linear, bspline or lanczos.
      default_value: value outside the grid's box (the crop's mm extent).

    Returns:
      float32 ``sitk.Image`` with the original file's size, origin, spacing
      and direction.

    Raises:
      ValueError: if ``grid_array`` does not have the grid's shape.
    """
    return grid_to_original(grid_array, self.grid_geometry, self.original_geometry,
                            interpolation=interpolation, default_value=default_value)


def grid_image(grid_array, grid_geometry: Geometry) -> sitk.Image:
  """Wraps ``[D, H, W]`` (or ``[D, H, W, 1]``) values as a float32 image on ``grid_geometry``.

  Raises:
    ValueError: if the array's shape is not ``grid_geometry.size`` reversed.
  """
  arr = np.asarray(grid_array, np.float32)
  if arr.ndim == 4 and arr.shape[-1] == 1:
    arr = arr[..., 0]
  expected = tuple(grid_geometry.size[::-1])
  if arr.shape != expected:
    raise ValueError(f"grid_array: expected shape {expected} [D, H, W], got {arr.shape}")
  return grid_geometry.apply_to(sitk.GetImageFromArray(arr))


def grid_to_original(grid_array, grid_geometry: Geometry, original_geometry: Geometry, *,
                     interpolation: str = "linear", default_value: float = 0.0) -> sitk.Image:
  """Resamples a grid-space map ``[D, H, W]`` onto an original image grid (physical space).

  For geometries stored with a prepared dataset (no ``PreprocessedCase`` at
  hand); see ``PreprocessedCase.to_original_space``.

  Returns:
    float32 ``sitk.Image`` on ``original_geometry``; ``default_value`` outside
    the grid's box.

  Raises:
    ValueError: wrong array shape or unknown interpolation.
  """
  if interpolation not in _INTERPOLATORS:
    raise ValueError(f"interpolation: {interpolation!r} not in {sorted(_INTERPOLATORS)}")
  return _resample(grid_image(grid_array, grid_geometry), original_geometry,
                   _INTERPOLATORS[interpolation], default_value)


# --------------------------------------------------------------------------
# Pipeline.


def _resample(img: sitk.Image, geom: Geometry, interpolator, default: float,
              pixel_type=sitk.sitkFloat32) -> sitk.Image:
  f = sitk.ResampleImageFilter()
  f.SetSize([int(s) for s in geom.size])
  f.SetOutputOrigin(geom.origin)
  f.SetOutputSpacing(geom.spacing)
  f.SetOutputDirection(geom.direction)
  f.SetInterpolator(interpolator)
  f.SetDefaultPixelValue(float(default))
  f.SetOutputPixelType(pixel_type)
  return f.Execute(img)


def _check_same_grid(ref_path: str, ref: Geometry, path: str, geom: Geometry, tol: float,
                     what: str) -> None:
  if tuple(geom.size) != tuple(ref.size):
    raise GeometryMismatchError(
        f"{what} {path}: grid size {geom.size} (i, j, k) differs from the first channel "
        f"{ref_path} {ref.size}")
  d = geometry_mismatch_mm(ref, geom)
  if d > tol:
    raise GeometryMismatchError(
        f"{what} {path}: grid is displaced by up to {d:.3g} mm from the first channel "
        f"{ref_path} (tolerance {tol} mm; origin {geom.origin} vs {ref.origin}, spacing "
        f"{geom.spacing} vs {ref.spacing}, direction {geom.direction} vs {ref.direction})")


def n4_bias_correct(img: sitk.Image, cfg: PreprocessConfig, *, path: str = "image") -> sitk.Image:
  """N4 bias-field correction (Tustison et al., IEEE TMI 2010) via SimpleITK.

  The field is fitted on a copy shrunk by ``cfg.n4_shrink`` in-plane (slice
  axis shrunk so voxels stay roughly isotropic) inside an Otsu foreground
  mask, then evaluated on the full grid: ``corrected = img / exp(log_bias)``.

  Args:
    img: float32 3-D image with non-negative intensities (MRI magnitude).
    cfg: supplies n4_shrink, n4_iterations, n4_convergence, n4_control_points.
    path: file name for error messages.

  Returns:
    float32 image on the same grid.

  Raises:
    ValueError: if the image has negative intensities (e.g. CT in HU).
  """
  stats = sitk.MinimumMaximumImageFilter()
  stats.Execute(img)
  if stats.GetMinimum() < 0:
    raise ValueError(f"{path}: N4 needs non-negative MR intensities, minimum is {stats.GetMinimum():.4g}")
  img = sitk.Cast(img, sitk.sitkFloat32)
  fg = sitk.OtsuThreshold(img, 0, 1, 200)  # 1 = above the Otsu threshold (foreground).
  spacing = np.asarray(img.GetSpacing())
  size = np.asarray(img.GetSize())
  shrink = np.maximum(1, np.round(cfg.n4_shrink * spacing.min() / spacing)).astype(int)
  shrink = np.minimum(shrink, np.maximum(1, size // 8)).tolist()  # Keep >= 8 voxels per axis.
  small = sitk.Shrink(img, shrink)
  small_fg = sitk.Shrink(fg, shrink)
  corrector = sitk.N4BiasFieldCorrectionImageFilter()
  corrector.SetMaximumNumberOfIterations(list(cfg.n4_iterations))
  corrector.SetConvergenceThreshold(cfg.n4_convergence)
  corrector.SetNumberOfControlPoints([cfg.n4_control_points] * 3)
  corrector.Execute(small, small_fg)
  log_bias = corrector.GetLogBiasFieldAsImage(img)
  return sitk.Cast(img / sitk.Exp(log_bias), sitk.sitkFloat32)


def _roi_box(mask_o: sitk.Image, path: str, cfg: PreprocessConfig) -> tuple[np.ndarray, np.ndarray]:
  """Centre and extent (mm, in the oriented frame's axes i, j, k) of the crop box.

  Frame coordinates u are measured from the centre of voxel 0 along the
  oriented image's axes, so a voxel index n sits at u = n * spacing.
  """
  arr = sitk.GetArrayViewFromImage(mask_o)  # [k, j, i]
  nz = np.nonzero(arr)
  if nz[0].size == 0:
    raise EmptyMaskError(f"{path}: tumour mask is empty (no non-zero voxel)")
  lo = np.array([nz[2].min(), nz[1].min(), nz[0].min()], np.float64)
  hi = np.array([nz[2].max(), nz[1].max(), nz[0].max()], np.float64)
  sp = np.asarray(mask_o.GetSpacing())
  centre = (lo + hi) / 2 * sp
  grid_xyz = np.asarray(cfg.grid[::-1], np.float64)
  if cfg.fov_mm is not None:
    extent = np.asarray(cfg.fov_mm[::-1], np.float64)
  else:
    extent = (hi - lo + 1) * sp + 2 * cfg.margin_mm
    if cfg.keep_aspect:
      extent = grid_xyz * np.max(extent / grid_xyz)
  return centre, extent


def _frame_geometry(frame: Geometry, centre: np.ndarray, extent: np.ndarray,
                    size: Sequence[int]) -> Geometry:
  """A grid of ``size`` voxels tiling the box (centre, extent) in ``frame``'s axes."""
  size = np.asarray(size, np.float64)
  spacing = extent / size
  lower = centre - extent / 2 + spacing / 2  # Centre of the first voxel, frame coordinates.
  origin = np.asarray(frame.origin) + frame.matrix @ lower
  return Geometry(tuple(int(s) for s in size), tuple(float(v) for v in origin),
                  tuple(float(v) for v in spacing), frame.direction)


def _minimum(img: sitk.Image) -> float:
  f = sitk.MinimumMaximumImageFilter()
  f.Execute(img)
  return f.GetMinimum()


def preprocess_case(image_paths: Sequence[PathLike] | PathLike, mask_path: PathLike,
                    cfg: PreprocessConfig = PreprocessConfig(), *,
                    full_check: bool = False) -> PreprocessedCase:
  """Turns one case's channels + tumour mask into a tumour-centred grid.

  See the module docstring for the steps and conventions.

  Args:
    image_paths: channel files (first = reference, e.g. T1c, then T2-FS), or
      one path.
    mask_path: tumour mask on the first channel's grid; non-zero = tumour.
    cfg: settings.
    full_check: decompress every file once more to verify its gzip CRC before
      reading (ITK's NIfTI reader passes mid-file corruption on silently);
      the default O(1) screen catches truncation only. Not part of the
      fingerprint: it never changes the output of a valid file.

  Returns:
    ``PreprocessedCase`` with ``volume`` float32 ``[D, H, W, C]``, ``mask``
    uint8 ``[D, H, W]`` and the grid geometry.

  Raises:
    ImageFileError: a file is missing, unreadable, truncated or not 3-D scalar.
    GeometryMismatchError: mask (or, with ``require_same_grid``, a channel)
      not on the first channel's grid within ``geometry_tol_mm``, or (without
      it) a channel that does not cover the tumour.
    EmptyMaskError: the mask (or its resampled version on the grid) is empty.
    ValueError: z-scoring a channel with zero variance inside the tumour, N4
      on negative intensities, or no image paths.
  """
  if isinstance(image_paths, (str, os.PathLike)):
    image_paths = [image_paths]
  paths = tuple(str(p) for p in image_paths)
  if not paths:
    raise ValueError("image_paths: at least one channel is needed")
  mask_path = str(mask_path)

  # Read and check geometry before any heavy work.
  ref = read_image(paths[0], full_check=full_check)
  ref_geom = Geometry.of(ref)
  mask = read_image(mask_path, pixel_type=sitk.sitkFloat32, full_check=full_check)
  _check_same_grid(paths[0], ref_geom, mask_path, Geometry.of(mask), cfg.geometry_tol_mm, "mask")
  # Masks are drawn on the first channel: adopt its exact geometry (within tolerance).
  mask = ref_geom.apply_to(sitk.Cast(sitk.NotEqual(mask, 0.0), sitk.sitkUInt8))
  channels = [ref]
  for p in paths[1:]:
    img = read_image(p, full_check=full_check)
    if cfg.require_same_grid:
      _check_same_grid(paths[0], ref_geom, p, Geometry.of(img), cfg.geometry_tol_mm, "channel")
    channels.append(img)

  if cfg.n4:
    channels = [n4_bias_correct(c, cfg, path=p) for c, p in zip(channels, paths)]

  # Canonical frame: the reoriented first channel (axes permuted/flipped only).
  mask_o = sitk.DICOMOrient(mask, cfg.orientation)
  frame = Geometry.of(mask_o)
  centre, extent = _roi_box(mask_o, mask_path, cfg)

  # Isotropic crop: size rounded up so spacing is exactly spacing_mm.
  iso_size = np.maximum(1, np.ceil(extent / cfg.spacing_mm - 1e-6)).astype(int)
  iso_extent = iso_size * cfg.spacing_mm
  iso = _frame_geometry(frame, centre, iso_extent, iso_size)
  grid = _frame_geometry(frame, centre, iso_extent, cfg.grid[::-1])

  interp = _INTERPOLATORS[cfg.interpolation]
  if cfg.mask_interpolation == "nearest":
    iso_mask = _resample(mask, iso, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
  else:
    iso_mask = sitk.Cast(_resample(mask, iso, sitk.sitkLinear, 0) >= 0.5, sitk.sitkUInt8)
  if not np.any(sitk.GetArrayViewFromImage(iso_mask)):
    raise EmptyMaskError(f"{mask_path}: tumour mask vanishes on the {cfg.spacing_mm} mm grid")

  # Anti-aliasing variance per axis (mm^2): sigma = (factor - 1) / 2 input voxels.
  factor = np.asarray(grid.spacing) / cfg.spacing_mm
  variance = (np.maximum(factor - 1, 0) / 2 * cfg.spacing_mm) ** 2
  smooth = cfg.antialias and bool(np.any(variance > 0))

  tumour_region = None
  if cfg.mask_to_periphery:
    dist = sitk.SignedMaurerDistanceMap(iso_mask, insideIsPositive=False, squaredDistance=False,
                                        useImageSpacing=True)
    tumour_region = _resample(sitk.Cast(dist <= cfg.periphery_mm, sitk.sitkUInt8), grid,
                              sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)

  grid_mask = _resample(iso_mask, grid, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
  mask_arr = sitk.GetArrayFromImage(grid_mask).astype(np.uint8)
  inside = mask_arr > 0
  if not inside.any():
    # A tumour smaller than one grid voxel misses every voxel centre under
    # nearest-neighbour: keep the voxels it covers most (partial volume).
    soft = sitk.Cast(iso_mask, sitk.sitkFloat32)
    if np.any(variance > 0):  # Spread over the grid voxel's footprint first.
      soft = sitk.DiscreteGaussian(soft, variance.tolist(), 32, 0.01, True)
    frac = sitk.GetArrayFromImage(_resample(soft, grid, sitk.sitkLinear, 0))
    if frac.max() > 0:
      inside = frac >= 0.5 * frac.max()
      mask_arr = inside.astype(np.uint8)
  if not inside.any():
    raise EmptyMaskError(f"{mask_path}: tumour mask vanishes on the {cfg.grid} grid")

  vols, fine = [], []
  for c, p in zip(channels, paths):
    pad = _minimum(c) if cfg.pad_value is None else cfg.pad_value
    if not cfg.require_same_grid and c is not ref:
      _check_covers(c, iso_mask, p)
    v = _resample(c, iso, interp, pad)
    fine.append(v)
    if smooth:
      v = sitk.DiscreteGaussian(v, variance.tolist(), 32, 0.01, True)
    vols.append(sitk.GetArrayFromImage(_resample(v, grid, interp, pad)))
  volume = np.stack(vols, axis=-1).astype(np.float32)

  means = stds = None
  if cfg.zscore:
    vals = volume[inside]  # [n_tumour_voxels, C]
    if len(vals) < _MIN_ZSCORE_VOXELS:
      # A tumour of a handful of grid voxels (e.g. 7 mm on a 4 mm grid) gives
      # unstable or zero-variance statistics: use the finer isotropic stage.
      iso_inside = sitk.GetArrayViewFromImage(iso_mask) > 0
      vals = np.stack([sitk.GetArrayViewFromImage(v)[iso_inside] for v in fine], axis=-1)
    means = vals.mean(axis=0, dtype=np.float64)
    stds = vals.std(axis=0, dtype=np.float64)
    for c, (sd, p) in enumerate(zip(stds, paths)):
      if not sd > 0:
        raise ValueError(f"{p}: channel {c} has zero intensity variance inside the tumour mask "
                         f"{mask_path}; cannot z-score")
    volume = ((volume - means) / stds).astype(np.float32)
    means, stds = tuple(float(m) for m in means), tuple(float(sd) for sd in stds)
  region = None
  if tumour_region is not None:
    region = sitk.GetArrayFromImage(tumour_region).astype(bool) | inside
    volume = np.where(region[..., None], volume, np.float32(0))
  if not np.all(np.isfinite(volume)):
    raise ValueError(f"{paths}: preprocessing produced non-finite values")

  return PreprocessedCase(volume=volume, mask=mask_arr, region=region, grid_geometry=grid,
                          original_geometry=ref_geom, channel_mean=means, channel_std=stds,
                          image_paths=paths, mask_path=mask_path, fingerprint=cfg.fingerprint())


def _check_covers(img: sitk.Image, iso_mask: sitk.Image, path: str) -> None:
  """Raises if some tumour voxel lies outside ``img``'s field of view."""
  arr = sitk.GetArrayViewFromImage(iso_mask)
  kji = np.argwhere(arr > 0)
  pts = Geometry.of(iso_mask).index_to_physical(kji[:, ::-1])
  geom = Geometry.of(img)
  idx = ((pts - np.asarray(geom.origin)) @ geom.matrix) / np.asarray(geom.spacing)
  size = np.asarray(geom.size)
  outside = np.any((idx < -0.5) | (idx > size - 0.5), axis=1)
  if outside.any():
    raise GeometryMismatchError(
        f"channel {path}: {int(outside.sum())} of {len(outside)} tumour voxels lie outside "
        "its field of view")


# --------------------------------------------------------------------------
# Real scans shipped in the pyradiomics source distribution (its ``data/``
# folder; AIM-Harvard/pyradiomics on GitHub).

PYRADIOMICS_VERSION = "3.0.1"
PYRADIOMICS_CASES = ("brain1", "brain2", "breast1", "lung1", "lung2")


def pyradiomics_cases(cases: Sequence[str] = ("brain1", "brain2")) -> dict[str, tuple[pathlib.Path, pathlib.Path]]:
  """Fetches (once) real tumour scans + label maps from the pyradiomics 3.0.1 sdist.

  brain1/brain2: brain MRI (apparently T1 post-contrast) with tumour label
  maps, NRRD; lung1/lung2: CT; breast1: MRI crop (AIM-Harvard/pyradiomics,
  ``data/``). BSD-3
  (Harvard); ``LICENSE.txt`` is extracted alongside. No outcomes exist.

  Returns:
    ``{case: (image_path, label_path)}`` under
    ``cache_dir("pyradiomics-3.0.1")/pyradiomics-3.0.1/data/``.

  Raises:
    ValueError: unknown case name.
    jaxsurv.data.fetch.FetchError: the sdist cannot be fetched.
  """
  from jaxsurv.data import fetch  # Local import: only this helper touches the network.
  unknown = sorted(set(cases) - set(PYRADIOMICS_CASES))
  if unknown:
    raise ValueError(f"cases: unknown {unknown}; available {list(PYRADIOMICS_CASES)}")
  root = fetch.cache_dir(f"pyradiomics-{PYRADIOMICS_VERSION}")
  prefix = f"pyradiomics-{PYRADIOMICS_VERSION}/"
  out = {c: (root / prefix / "data" / f"{c}_image.nrrd", root / prefix / "data" / f"{c}_label.nrrd")
         for c in cases}
  members = [str(p.relative_to(root)) for pair in out.values() for p in pair] + [prefix + "LICENSE.txt"]
  if all((root / m).is_file() for m in members):
    return out
  archive = fetch.pip_archive("pyradiomics", PYRADIOMICS_VERSION, sdist=True)
  with tarfile.open(archive, "r:gz") as tf:
    for m in members:
      info = tf.getmember(m)
      tmp = root / (m + ".part")
      tmp.parent.mkdir(parents=True, exist_ok=True)
      with tf.extractfile(info) as src, open(tmp, "wb") as dst:
        while chunk := src.read(1 << 22):
          dst.write(chunk)
      os.replace(tmp, root / m)  # Atomic: a concurrent reader never sees a partial file.
  return out
