"""Per-patient bags of tile features (WSI), their padding, and synthetic bags.

A *bag* is one patient's tile embeddings, a float array ``[n_tiles, dim]``
whose ``n_tiles`` varies from patient to patient (PORPOISE concatenates the
``.pt`` feature files of all of a patient's slides: mahmoodlab/PORPOISE
``datasets/dataset_survival.py``). This module

* reads bags from ``.npy`` files (``numpy.load``, no pickles) and from
  ``.safetensors`` files. safetensors is read with numpy from its documented
  layout (an 8-byte little-endian header length N, N bytes of JSON mapping
  each tensor name to ``{"dtype", "shape", "data_offsets"}`` plus an optional
  ``"__metadata__"``, then the raw little-endian, row-major byte buffer), so
  the ``safetensors`` package is not needed. ``.pt`` (torch pickles) is not
  read: convert them to one of the two formats first;
* pads variable-size bags to one array ``[n, max_tiles, dim]`` with a tile
  mask ``[n, max_tiles]`` (:func:`pad_bags`), subsampling larger bags;
* generates synthetic bags (jaxsurv's own generator) whose phenotype mix
  depends on a real patient-level covariate such as the TCGA-BRCA PAM50
  subtype and never on the outcome (:func:`synthetic_bags`), and an
  independent-noise control with the same marginal statistics but no
  relation to anything (:func:`noise_bags`).

A bag with zero tiles is a *missing* modality for that patient (presence
False), never an error and never a row of zeros treated as a tile.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import struct
from typing import Any, Hashable, Mapping, Sequence

import numpy as np

# safetensors dtype codes (the format's documentation) -> numpy dtypes.
# BF16/F8 come from ml_dtypes, which JAX itself depends on.
_ST_DTYPES = {
    "BOOL": np.dtype(np.bool_), "U8": np.dtype("u1"), "I8": np.dtype("i1"),
    "U16": np.dtype("<u2"), "I16": np.dtype("<i2"), "F16": np.dtype("<f2"),
    "U32": np.dtype("<u4"), "I32": np.dtype("<i4"), "F32": np.dtype("<f4"),
    "U64": np.dtype("<u8"), "I64": np.dtype("<i8"), "F64": np.dtype("<f8"),
}
try:  # pragma: no branch - ml_dtypes ships with jax.
  import ml_dtypes
  _ST_DTYPES.update({"BF16": np.dtype(ml_dtypes.bfloat16),
                     "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
                     "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn)})
except ImportError:  # pragma: no cover
  pass
_ST_CODES = {v: k for k, v in _ST_DTYPES.items()}
# The reference implementation refuses headers above 100 MB; so do we, so that
# a corrupt length field cannot make us allocate gigabytes.
_ST_MAX_HEADER = 100_000_000

BAG_SUFFIXES = (".npy", ".safetensors")
PHENOTYPES = ("tumour", "stroma", "necrosis", "lymphocytes", "fat", "background")
RARE_PHENOTYPE = "high_risk"
# Base Dirichlet concentration of the six phenotypes (sum 10): tumour and
# stroma dominate a typical breast-cancer slide, necrosis is rare.
_BASE_CONCENTRATION = (3.0, 2.5, 0.5, 1.5, 1.0, 1.5)


class BagError(ValueError):
  """A bag file is unreadable or has the wrong shape/dtype.

  The message names the patient (when known) and the file.
  """


def _who(patient_id, path) -> str:
  parts = []
  if patient_id is not None:
    parts.append(f"patient {patient_id!r}")
  if path is not None:
    parts.append(f"file {str(path)!r}")
  return ", ".join(parts) or "bag"


# ----------------------------------------------------------------------------
# safetensors (read and write with numpy, from the format's specification).
# ----------------------------------------------------------------------------


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """Reads every tensor of a ``.safetensors`` file with numpy.

  Layout (safetensors format specification): bytes 0-7 are the header size N
  as an unsigned little-endian 64-bit integer; bytes 8..8+N are a UTF-8 JSON
  object ``{name: {"dtype": "F32", "shape": [...], "data_offsets": [begin,
  end]}, "__metadata__": {str: str}}`` (possibly right-padded with spaces);
  the rest is the byte buffer, offsets relative to its start, little-endian,
  row-major, and fully covered by the tensors (no holes).

  Args:
    path: file path.

  Returns:
    ``(tensors, metadata)``: ``{name: array with the stored dtype and
    shape}`` (copies, writable) and the ``__metadata__`` dict (empty if none).

  Raises:
    BagError: truncated file, bad header length, invalid JSON, unknown dtype,
      offsets outside the buffer, a size that does not match dtype x shape,
      overlapping tensors or holes in the buffer (the message names the file
      and tensor).
    FileNotFoundError: ``path`` does not exist.
  """
  path = pathlib.Path(path)
  raw = path.read_bytes()
  where = f"safetensors file {str(path)!r}"
  if len(raw) < 8:
    raise BagError(f"{where}: {len(raw)} bytes, too short for the 8-byte header length")
  (n,) = struct.unpack("<Q", raw[:8])
  if n > _ST_MAX_HEADER or 8 + n > len(raw):
    raise BagError(f"{where}: header length {n} exceeds the file size ({len(raw)} bytes) "
                   f"or the {_ST_MAX_HEADER}-byte limit; not a safetensors file?")
  try:
    header = json.loads(raw[8:8 + n].decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise BagError(f"{where}: header is not UTF-8 JSON: {e}") from e
  if not isinstance(header, dict):
    raise BagError(f"{where}: header is not a JSON object")
  metadata = header.pop("__metadata__", None) or {}
  if not isinstance(metadata, dict):
    raise BagError(f"{where}: __metadata__ is not an object")
  buf = memoryview(raw)[8 + n:]
  tensors, spans = {}, []
  for name, info in header.items():
    try:
      code, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
      shape = tuple(int(s) for s in shape)
      begin, end = int(begin), int(end)
    except (KeyError, TypeError, ValueError) as e:
      raise BagError(f"{where}: tensor {name!r} has a malformed entry {info!r}") from e
    if code not in _ST_DTYPES:
      raise BagError(f"{where}: tensor {name!r} has unsupported dtype {code!r}; "
                     f"supported: {sorted(_ST_DTYPES)}")
    if any(s < 0 for s in shape):
      raise BagError(f"{where}: tensor {name!r} has a negative dimension in {shape}")
    dtype = _ST_DTYPES[code]
    count = int(np.prod(shape, dtype=np.int64))
    if not 0 <= begin <= end <= len(buf):
      raise BagError(f"{where}: tensor {name!r} offsets [{begin}, {end}] outside the "
                     f"{len(buf)}-byte buffer (truncated file?)")
    if end - begin != count * dtype.itemsize:
      raise BagError(f"{where}: tensor {name!r} spans {end - begin} bytes but {code} "
                     f"{list(shape)} needs {count * dtype.itemsize}")
    tensors[name] = np.frombuffer(buf[begin:end], dtype=dtype, count=count).reshape(shape).copy()
    spans.append((begin, end, name))
  # The specification requires the tensors to tile the buffer exactly; a gap
  # or an overlap means a corrupt or hand-edited file.
  pos = 0
  for begin, end, name in sorted(spans):
    if begin != pos:
      kind = "overlaps the previous tensor" if begin < pos else f"leaves a hole at byte {pos}"
      raise BagError(f"{where}: tensor {name!r} {kind}")
    pos = end
  if pos != len(buf):
    raise BagError(f"{where}: {len(buf) - pos} trailing bytes not covered by any tensor")
  return tensors, {str(k): str(v) for k, v in metadata.items()}


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, Any], *,
                      metadata: Mapping[str, str] | None = None) -> pathlib.Path:
  """Writes arrays as a ``.safetensors`` file (the layout of :func:`read_safetensors`).

  Tensors are stored in name order, the header is padded with spaces to a
  multiple of 8 bytes (as the reference writer does, so the buffer is
  aligned). The file is written atomically.

  Args:
    path: destination.
    tensors: ``{name: array}``; dtypes among bool, (u)int8-64, float16/32/64,
      bfloat16.
    metadata: optional ``{str: str}`` stored as ``__metadata__``.

  Returns:
    The path written.

  Raises:
    ValueError: a name is ``"__metadata__"``, an unsupported dtype, or
      non-string metadata.
  """
  header, chunks, pos = {}, [], 0
  for name in sorted(tensors):
    if name == "__metadata__":
      raise ValueError("write_safetensors: '__metadata__' is reserved, not a tensor name")
    arr = np.asarray(tensors[name])
    dtype = arr.dtype.newbyteorder("<") if arr.dtype.byteorder == ">" else arr.dtype
    key = np.dtype(dtype)
    if key not in _ST_CODES:
      raise ValueError(f"write_safetensors: tensor {name!r} has unsupported dtype {arr.dtype}")
    data = np.ascontiguousarray(arr, dtype=dtype).tobytes()
    header[name] = {"dtype": _ST_CODES[key], "shape": list(arr.shape),
                    "data_offsets": [pos, pos + len(data)]}
    chunks.append(data)
    pos += len(data)
  if metadata:
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
      raise ValueError("write_safetensors: metadata must map str to str")
    header = {"__metadata__": dict(metadata), **header}
  text = json.dumps(header, separators=(",", ":")).encode("utf-8")
  text += b" " * (-len(text) % 8)
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.name + f".tmp{os.getpid()}")
  with open(tmp, "wb") as f:
    f.write(struct.pack("<Q", len(text)))
    f.write(text)
    for c in chunks:
      f.write(c)
  os.replace(tmp, path)
  return path


# ----------------------------------------------------------------------------
# Loading bags.
# ----------------------------------------------------------------------------


def _as_bag(arr: np.ndarray, patient_id, path) -> np.ndarray:
  """Checks rank, dtype and finiteness; returns float32 ``[n_tiles, dim]``."""
  who = _who(patient_id, path)
  if arr.ndim != 2:
    raise BagError(f"{who}: a bag must be [n_tiles, feature_dim], got shape {arr.shape}")
  # Kind "V" covers the ml_dtypes floats (bfloat16, float8) of safetensors.
  if arr.dtype.kind not in "biufV":
    raise BagError(f"{who}: expected numeric tile features, got dtype {arr.dtype}")
  try:
    out = arr.astype(np.float32)
  except (TypeError, ValueError) as e:
    raise BagError(f"{who}: cannot convert dtype {arr.dtype} to float32: {e}") from e
  bad = ~np.isfinite(out).all(axis=1)
  if bad.any():
    rows = np.flatnonzero(bad)
    raise BagError(f"{who}: NaN or infinite features in tiles {rows[:10].tolist()}"
                   f"{' ...' if rows.size > 10 else ''} ({rows.size} tiles)")
  return out


def load_bag(path: str | os.PathLike, *, patient_id: str | None = None,
             key: str | None = None) -> np.ndarray:
  """Reads one bag of tile features from ``.npy`` or ``.safetensors``.

  Args:
    path: a ``.npy`` file holding one ``[n_tiles, dim]`` array (no pickles),
      or a ``.safetensors`` file. For safetensors, the tensor ``key`` is used;
      without ``key`` the file's only tensor, or else its ``"features"``
      tensor.
    patient_id: named in error messages.
    key: tensor name inside a safetensors file.

  Returns:
    float32 ``[n_tiles, dim]``; ``n_tiles`` may be 0 (a missing modality).

  Raises:
    BagError: unknown suffix, unreadable/corrupt file, ambiguous or absent
      safetensors key, rank other than 2, non-numeric dtype, or NaN/inf
      features; the message names the patient and the file.
    FileNotFoundError: the file does not exist (message names the patient).
  """
  path = pathlib.Path(path)
  who = _who(patient_id, path)
  suffix = path.suffix.lower()
  if suffix not in BAG_SUFFIXES:
    raise BagError(f"{who}: unsupported bag format {path.suffix!r}; expected one of "
                   f"{list(BAG_SUFFIXES)} (convert .pt files with torch first)")
  if not path.is_file():
    raise FileNotFoundError(f"{who}: bag file does not exist")
  if suffix == ".npy":
    try:
      arr = np.load(path, allow_pickle=False)
    except Exception as e:  # numpy raises ValueError/OSError/EOFError variously.
      raise BagError(f"{who}: cannot read .npy: {type(e).__name__}: {e}") from e
  else:
    try:
      tensors, _ = read_safetensors(path)
    except BagError as e:
      raise BagError(f"patient {patient_id!r}: {e}" if patient_id is not None else str(e)) from e
    if key is not None:
      if key not in tensors:
        raise BagError(f"{who}: no tensor {key!r}; tensors: {sorted(tensors)}")
      arr = tensors[key]
    elif len(tensors) == 1:
      arr = next(iter(tensors.values()))
    elif "features" in tensors:
      arr = tensors["features"]
    else:
      raise BagError(f"{who}: {len(tensors)} tensors {sorted(tensors)} and no 'features'; "
                     "pass key=")
  return _as_bag(arr, patient_id, path)


def load_bags(patient_ids: Sequence[str],
              files: Mapping[str, str | os.PathLike | Sequence[str | os.PathLike] | None], *,
              key: str | None = None) -> tuple[list[np.ndarray], np.ndarray]:
  """Reads the bags of many patients, in ``patient_ids`` order.

  A patient may have several files (e.g. one per slide); their tiles are
  concatenated along the tile axis, as PORPOISE does for multi-slide
  patients (mahmoodlab/PORPOISE ``datasets/dataset_survival.py``). A patient
  absent from ``files``, mapped to ``None`` or to an empty list, or whose
  files hold zero tiles in total, is missing (presence False, bag
  ``[0, dim]``).

  Args:
    patient_ids: ``[n]`` patient ids.
    files: ``{patient_id: path | [paths] | None}``.
    key: safetensors tensor name (see :func:`load_bag`).

  Returns:
    ``(bags, presence)``: a list of ``n`` float32 ``[n_tiles_i, dim]`` arrays
    and bool ``[n]`` (True where the patient has at least one tile).

  Raises:
    BagError: as :func:`load_bag`, or a file whose feature dimension differs
      from the first file read (the message names both patients and files).
    FileNotFoundError: a listed file does not exist.
  """
  bags, presence = [], []
  ref = None  # (dim, patient, file) of the first non-empty bag.
  for pid in patient_ids:
    entry = files.get(pid)
    paths = [] if entry is None else ([entry] if isinstance(entry, (str, os.PathLike))
                                      else list(entry))
    parts = []
    for p in paths:
      b = load_bag(p, patient_id=pid, key=key)
      if b.shape[0] == 0:
        continue  # Zero tiles: contributes nothing, its dim is irrelevant.
      if ref is None:
        ref = (b.shape[1], pid, str(p))
      elif b.shape[1] != ref[0]:
        raise BagError(f"{_who(pid, p)}: feature dim {b.shape[1]} differs from dim {ref[0]} "
                       f"of patient {ref[1]!r}, file {ref[2]!r}")
      parts.append(b)
    if parts:
      bags.append(np.concatenate(parts, axis=0))
      presence.append(True)
    else:
      bags.append(None)
      presence.append(False)
  dim = 0 if ref is None else ref[0]
  bags = [np.zeros((0, dim), np.float32) if b is None else b for b in bags]
  return bags, np.asarray(presence, dtype=bool)


# ----------------------------------------------------------------------------
# Padding.
# ----------------------------------------------------------------------------


def _generator(rng) -> np.random.Generator | None:
  if rng is None or isinstance(rng, np.random.Generator):
    return rng
  if isinstance(rng, (int, np.integer)):
    return np.random.default_rng(int(rng))
  raise TypeError(f"rng must be a numpy Generator, an int seed or None, got {type(rng).__name__}")


def pad_bags(bags: Sequence[np.ndarray | None], max_tiles: int | None = None, *,
             rng: np.random.Generator | int | None = None, dim: int | None = None,
             patient_ids: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Pads variable-size bags into one array and a tile mask.

  Bags longer than ``max_tiles`` are subsampled: ``max_tiles`` distinct tiles
  drawn uniformly without replacement by ``rng.choice``, kept in their
  original order. Bags are processed in list order, each drawing from the
  same generator, so the result is deterministic given the seed and the bag
  order (SurvPath likewise samples a fixed number of patches per bag).

  Args:
    bags: ``n`` arrays ``[n_tiles_i, dim]``; ``None`` or zero tiles = missing.
    max_tiles: padded length; default the largest bag (at least 1, so the
      array is never empty along the tile axis).
    rng: numpy Generator or int seed; needed only if a bag exceeds
      ``max_tiles`` (deterministic subsampling, never an implicit seed).
    dim: feature dim; inferred from the first non-empty bag when omitted
      (or from an empty ``[0, dim]`` bag when every bag is empty).
    patient_ids: ``[n]`` ids named in error messages.

  Returns:
    ``(features float32 [n, max_tiles, dim], tile_mask bool [n, max_tiles])``;
    padding rows are 0 with mask False; a missing bag has an all-False mask.

  Raises:
    ValueError: a bag not of rank 2, inconsistent feature dims (naming the
      patient/bag and the reference one), ``max_tiles < 1``, all bags empty
      without ``dim``, or a bag longer than ``max_tiles`` without ``rng``.
  """
  n = len(bags)
  if patient_ids is not None and len(patient_ids) != n:
    raise ValueError(f"patient_ids has {len(patient_ids)} entries for {n} bags")
  name = (lambda i: f"patient {patient_ids[i]!r}") if patient_ids is not None \
      else (lambda i: f"bag {i}")
  arrays, ref, empty_dim = [], None, None
  for i, b in enumerate(bags):
    if b is None:
      arrays.append(None)
      continue
    b = np.asarray(b)
    if b.ndim != 2:
      raise ValueError(f"{name(i)}: a bag must be [n_tiles, dim], got shape {b.shape}")
    if b.shape[0] == 0:
      empty_dim = b.shape[1] if empty_dim is None else empty_dim
      arrays.append(None)
      continue
    if ref is None:
      ref = (b.shape[1], i)
    elif b.shape[1] != ref[0]:
      raise ValueError(f"{name(i)}: feature dim {b.shape[1]} differs from dim {ref[0]} of "
                       f"{name(ref[1])}")
    arrays.append(b)
  if ref is not None and dim is not None and dim != ref[0]:
    raise ValueError(f"dim={dim} but {name(ref[1])} has feature dim {ref[0]}")
  if ref is None and dim is None:
    if empty_dim is None:
      raise ValueError("every bag is empty; pass dim= to build the padded array")
    dim = empty_dim  # All bags empty but shaped [0, dim].
  d = ref[0] if ref is not None else int(dim)
  longest = max((a.shape[0] for a in arrays if a is not None), default=0)
  t = max(longest, 1) if max_tiles is None else int(max_tiles)
  if t < 1:
    raise ValueError(f"max_tiles must be >= 1, got {max_tiles}")
  gen = _generator(rng)
  out = np.zeros((n, t, d), np.float32)
  mask = np.zeros((n, t), bool)
  for i, a in enumerate(arrays):
    if a is None:
      continue
    if a.shape[0] > t:
      if gen is None:
        raise ValueError(f"{name(i)}: {a.shape[0]} tiles exceed max_tiles={t}; pass rng= "
                         "(Generator or seed) to subsample deterministically")
      a = a[np.sort(gen.choice(a.shape[0], size=t, replace=False))]
    out[i, :a.shape[0]] = a
    mask[i, :a.shape[0]] = True
  return out, mask


# ----------------------------------------------------------------------------
# Synthetic bags (jaxsurv's own generator; no published model).
# ----------------------------------------------------------------------------


def _stable_int(*parts) -> int:
  """A 64-bit integer from strings, stable across processes (unlike hash())."""
  h = hashlib.sha256("\x1f".join(str(p) for p in parts).encode("utf-8")).digest()
  return int.from_bytes(h[:8], "little")


def _rng(seed: int, *parts) -> np.random.Generator:
  # Seeded by a hash of (seed, parts): one independent stream per patient,
  # label or site, whatever else is generated alongside.
  return np.random.default_rng(_stable_int(int(seed), *parts))


@dataclasses.dataclass(frozen=True)
class SyntheticBags:
  """Output of :func:`synthetic_bags` / :func:`noise_bags`.

  Attributes:
    patient_ids: ``[n]`` ids (str), the input order.
    bags: ``n`` float32 arrays ``[n_tiles_i, dim]``.
    proportions: float64 ``[n, K]`` patient-level phenotype proportions drawn
      from the Dirichlet (before rare-tile replacement).
    tile_phenotype: ``n`` int8 arrays ``[n_tiles_i]``: the phenotype of each
      tile, ``K`` for a rare high-risk tile.
    phenotype_names: the ``K`` phenotype names, then ``"high_risk"``.
    concentration: ``{label_key: [K]}`` Dirichlet concentrations used.
  """
  patient_ids: tuple[str, ...]
  bags: list
  proportions: np.ndarray
  tile_phenotype: list
  phenotype_names: tuple[str, ...]
  concentration: Mapping[str, tuple[float, ...]]

  def pad(self, max_tiles: int | None = None, *, rng=None) -> tuple[np.ndarray, np.ndarray]:
    """:func:`pad_bags` of these bags (``[n, max_tiles, dim]``, ``[n, max_tiles]``)."""
    return pad_bags(self.bags, max_tiles, rng=rng, patient_ids=self.patient_ids)


def _label_key(label) -> str:
  # 2, 2.0 and "2" are one label (a table re-read from CSV keeps its classes).
  from jaxsurv.data.clinical import level_key  # pylint: disable=import-outside-toplevel
  k = level_key(label)
  if k is None:
    raise ValueError("missing label")
  return k


def synthetic_bags(labels: Sequence[Hashable], *, patient_ids: Sequence[str],
                   n_tiles_range: tuple[int, int] = (50, 300), dim: int = 384,
                   n_phenotypes: int = 6, seed: int = 0, label_effect: float = 1.0,
                   concentration: Mapping[Hashable, Sequence[float]] | None = None,
                   rare_high_risk: Mapping[Hashable, float] | None = None,
                   phenotype_scale: float = 1.0, tile_noise: float = 1.0,
                   sites: Sequence[Hashable] | None = None, site_shift: float = 0.0,
                   site_scale: float = 0.0) -> SyntheticBags:
  """Synthetic WSI tile-feature bags driven by a patient-level label.

  Generative model, per patient i with label L_i:

  * ``n_tiles_i ~ Uniform{lo, ..., hi}`` (independent of the label);
  * phenotype proportions ``p_i ~ Dirichlet(alpha_{L_i})`` over K tissue
    phenotypes (tumour, stroma, necrosis, lymphocytes, fat, background for
    K = 6). ``alpha_L = base * exp(label_effect * z_L)``, ``z_L ~ N(0, I_K)``
    drawn from ``(seed, L)`` alone, with ``base`` a fixed breast-tissue-like
    profile (sum 10), unless ``concentration`` gives ``alpha_L`` explicitly;
  * each tile's phenotype ``k ~ Categorical(p_i)`` and embedding
    ``x = mu_k + tile_noise * eps``, ``mu_k ~ N(0, phenotype_scale^2 I_dim)``
    drawn from ``seed`` alone, ``eps ~ N(0, I_dim)``;
  * optional rare high-risk tiles: for patients whose label has a fraction
    ``f > 0`` in ``rare_high_risk``, ``max(1, round(f * n_tiles_i))`` random
    tiles are replaced by draws around an extra mean ``mu_K`` (the evidence an
    attention-MIL model must find; tile_phenotype = K);
  * optional site (stain/batch) effect, affine per site s:
    ``x <- x * (1 + site_scale * g_s) + site_shift * h_s`` with
    ``g_s, h_s ~ N(0, I_dim)`` drawn from ``(seed, s)``.

  Each patient's draws come from a generator seeded by ``(seed, patient_id)``,
  so a patient's bag depends only on the seed, its id, its label (and site)
  and the settings: not on the other patients, their order, or any outcome.
  The generator takes no outcome argument; pass a real covariate (e.g.
  TCGA-BRCA ``pam50``) so that a fusion model is tested against real biology
  without leaking survival.

  Args:
    labels: ``[n]`` label per patient (any hashable; ``2``, ``2.0`` and
      ``"2"`` are the same label). Missing labels raise.
    patient_ids: ``[n]`` unique patient ids.
    n_tiles_range: inclusive ``(lo, hi)`` tiles per patient, ``0 <= lo <=
      hi``. 200-2000 tiles per patient is more realistic; the default is
      smaller for speed. ``lo = 0`` allows empty (missing) bags.
    dim: embedding dim (384/768/1024 for ViT-S/B/L-like extractors).
    n_phenotypes: K (at most 6 named phenotypes; more are named
      ``phenotype<k>``).
    seed: integer seed.
    label_effect: log-scale spread of the per-label concentrations (0 makes
      every label share ``base``, i.e. bags carry no label information).
    concentration: optional ``{label: [K] positive}`` explicit concentrations
      (every label present must be listed).
    rare_high_risk: optional ``{label: fraction in [0, 1)}``.
    phenotype_scale, tile_noise: spread of the phenotype means and of the
      tiles around them.
    sites: optional ``[n]`` site/hospital per patient.
    site_shift, site_scale: strength of the additive and multiplicative site
      effect (0 = none).

  Returns:
    :class:`SyntheticBags`.

  Raises:
    ValueError: length mismatch, duplicate ids, missing labels, bad ranges,
      non-positive concentrations, a label absent from ``concentration``, or
      a rare fraction outside ``[0, 1)``.
  """
  ids = [str(p) for p in patient_ids]
  n = len(ids)
  if len(labels) != n:
    raise ValueError(f"labels has {len(labels)} entries for {n} patient_ids")
  if len(set(ids)) != n:
    dup = sorted({p for p in ids if ids.count(p) > 1})[:10]
    raise ValueError(f"patient_ids: duplicate ids {dup}")
  if sites is not None and len(sites) != n:
    raise ValueError(f"sites has {len(sites)} entries for {n} patient_ids")
  lo, hi = (int(v) for v in n_tiles_range)
  if not 0 <= lo <= hi:
    raise ValueError(f"n_tiles_range must satisfy 0 <= lo <= hi, got {n_tiles_range}")
  if dim < 1 or n_phenotypes < 1:
    raise ValueError(f"dim and n_phenotypes must be >= 1, got {dim}, {n_phenotypes}")
  keys = []
  for i, lab in enumerate(labels):
    try:
      keys.append(_label_key(lab))
    except ValueError:
      raise ValueError(f"labels: patient {ids[i]!r} has a missing label") from None
  k = int(n_phenotypes)
  names = tuple(PHENOTYPES[j] if j < len(PHENOTYPES) else f"phenotype{j}" for j in range(k))
  base = np.array([_BASE_CONCENTRATION[j] if j < len(_BASE_CONCENTRATION) else 1.0
                   for j in range(k)])

  alphas = {}
  if concentration is not None:
    given = {_label_key(l): np.asarray(a, np.float64) for l, a in concentration.items()}
    for key in sorted(set(keys)):
      if key not in given:
        raise ValueError(f"concentration has no entry for label {key!r}")
      a = given[key]
      if a.shape != (k,) or not np.all(np.isfinite(a)) or np.any(a <= 0):
        raise ValueError(f"concentration[{key!r}] must be {k} positive numbers, got {a}")
      alphas[key] = a
  else:
    for key in sorted(set(keys)):
      z = _rng(seed, "label-concentration", key).standard_normal(k)
      alphas[key] = base * np.exp(label_effect * z)
  rare = {}
  for lab, f in (rare_high_risk or {}).items():
    f = float(f)
    if not 0 <= f < 1:
      raise ValueError(f"rare_high_risk[{lab!r}] must be in [0, 1), got {f}")
    rare[_label_key(lab)] = f

  means = (_rng(seed, "phenotype-means").standard_normal((k + 1, dim))
           * phenotype_scale).astype(np.float32)
  site_params = {}
  if sites is not None and (site_shift or site_scale):
    for s in {_label_key(s) for s in sites}:
      g = _rng(seed, "site", s)
      site_params[s] = (1.0 + site_scale * g.standard_normal(dim),
                        site_shift * g.standard_normal(dim))

  bags, props, tiles = [], np.zeros((n, k)), []
  for i, (pid, key) in enumerate(zip(ids, keys)):
    g = _rng(seed, "patient", pid)
    n_tiles = int(g.integers(lo, hi + 1))
    p = g.dirichlet(alphas[key])
    props[i] = p
    pheno = g.choice(k, size=n_tiles, p=p).astype(np.int8)
    f = rare.get(key, 0.0)
    if f > 0 and n_tiles > 0:
      n_rare = min(n_tiles, max(1, round(f * n_tiles)))
      pheno[g.choice(n_tiles, size=n_rare, replace=False)] = k
    # float32 draws: half the memory and time of float64, ample for features.
    x = means[pheno] + np.float32(tile_noise) * g.standard_normal((n_tiles, dim),
                                                                  dtype=np.float32)
    if site_params:
      scale, shift = site_params[_label_key(sites[i])]
      x = x * scale.astype(np.float32) + shift.astype(np.float32)
    bags.append(x)
    tiles.append(pheno)
  return SyntheticBags(tuple(ids), bags, props, tiles, names + (RARE_PHENOTYPE,),
                       {key: tuple(float(v) for v in a) for key, a in alphas.items()})


def noise_bags(patient_ids: Sequence[str], *, n_tiles_range: tuple[int, int] = (50, 300),
               dim: int = 384, n_phenotypes: int = 6, seed: int = 0,
               phenotype_scale: float = 1.0, tile_noise: float = 1.0) -> SyntheticBags:
  """Independent-noise control bags: same kind of data, unrelated to anything.

  Same generative model as :func:`synthetic_bags` (so bag sizes, phenotype
  means and tile statistics look alike), but every patient draws its
  proportions from the one shared base concentration: bags depend only on
  ``(seed, patient_id)``, not on any covariate, label or outcome. A fusion
  model given these bags should learn to ignore them (a jaxsurv control for
  the CM-MMF runs).

  Args and Returns: as :func:`synthetic_bags`.

  Raises:
    ValueError: as :func:`synthetic_bags`.
  """
  ids = [str(p) for p in patient_ids]
  # One label for everyone and label_effect 0: the Dirichlet is the base one.
  # A separate seed stream ("noise") keeps these bags distinct from
  # informative bags generated with the same seed.
  return synthetic_bags(["noise"] * len(ids), patient_ids=ids, n_tiles_range=n_tiles_range,
                        dim=dim, n_phenotypes=n_phenotypes, seed=_stable_int("noise", int(seed)),
                        label_effect=0.0, phenotype_scale=phenotype_scale,
                        tile_noise=tile_noise)
