"""Tests for jaxsurv.data.bags: bag files, padding and synthetic WSI bags.

safetensors files are written here byte by byte from the format's
specification (8-byte little-endian header length, JSON header, raw buffer),
independently of the module's own writer.
"""

import json
import struct

import numpy as np
import pytest
from scipy import stats
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_score

from jaxsurv.data import bags


def _st_by_hand(path, entries, metadata=None, pad=0):
  """entries: [(name, code, shape, raw_bytes)] laid out in the given order."""
  header, buf = {}, b""
  for name, code, shape, raw in entries:
    header[name] = {"dtype": code, "shape": list(shape),
                    "data_offsets": [len(buf), len(buf) + len(raw)]}
    buf += raw
  if metadata is not None:
    header["__metadata__"] = metadata
  text = json.dumps(header).encode() + b" " * pad
  path.write_bytes(struct.pack("<Q", len(text)) + text + buf)
  return path


def _bf16_bytes(values):
  # bfloat16 = the top 16 bits of the float32 pattern (exact for these values).
  bits = np.asarray(values, "<f4").view("<u4") >> 16
  return bits.astype("<u2").tobytes()


# ----------------------------------------------------------------------------
# safetensors / npy reading.


def test_safetensors_by_hand_dtypes_and_metadata(tmp_path):
  f32 = np.arange(12, dtype="<f4").reshape(3, 4) / 4
  f16 = np.array([[0.5, -1.0], [2.0, 3.25]], "<f2")
  i64 = np.array([-3, 7, 2**40], "<i8")
  bf = np.array([[1.5, -2.0, 0.0], [4.0, 0.25, -0.125]], "<f4")
  path = _st_by_hand(tmp_path / "a.safetensors", [
      ("features", "F32", f32.shape, f32.tobytes()),
      ("half", "F16", f16.shape, f16.tobytes()),
      ("coords", "I64", i64.shape, i64.tobytes()),
      ("bf", "BF16", bf.shape, _bf16_bytes(bf)),
  ], metadata={"extractor": "uni"}, pad=5)
  tensors, meta = bags.read_safetensors(path)
  assert meta == {"extractor": "uni"}
  np.testing.assert_array_equal(tensors["features"], f32)
  np.testing.assert_array_equal(tensors["half"], f16)
  np.testing.assert_array_equal(tensors["coords"], i64)
  np.testing.assert_array_equal(tensors["bf"].astype(np.float32), bf)
  # Several tensors: 'features' is the default bag, key= picks another.
  np.testing.assert_array_equal(bags.load_bag(path), f32)
  out = bags.load_bag(path, key="bf")
  assert out.dtype == np.float32 and out.shape == (2, 3)
  np.testing.assert_array_equal(out, bf)
  np.testing.assert_array_equal(bags.load_bag(path, key="half"), f16.astype(np.float32))


def test_write_safetensors_matches_spec(tmp_path):
  x = np.random.default_rng(0).normal(size=(5, 3)).astype(np.float32)
  y = np.array([1, 2], np.int32)
  p = bags.write_safetensors(tmp_path / "w.safetensors", {"x": x, "y": y},
                             metadata={"k": "v"})
  raw = p.read_bytes()
  (n,) = struct.unpack("<Q", raw[:8])
  assert n % 8 == 0
  header = json.loads(raw[8:8 + n])
  assert header["__metadata__"] == {"k": "v"}
  data = raw[8 + n:]
  hx, hy = header["x"], header["y"]
  assert hx["dtype"] == "F32" and hx["shape"] == [5, 3]
  assert hy["dtype"] == "I32" and hy["shape"] == [2]
  b, e = hx["data_offsets"]
  np.testing.assert_array_equal(np.frombuffer(data[b:e], "<f4").reshape(5, 3), x)
  b, e = hy["data_offsets"]
  np.testing.assert_array_equal(np.frombuffer(data[b:e], "<i4"), y)
  # And back through the reader.
  t, meta = bags.read_safetensors(p)
  np.testing.assert_array_equal(t["x"], x)
  assert meta == {"k": "v"}


def test_npy_round_trip_and_float64_to_float32(tmp_path):
  x = np.random.default_rng(1).normal(size=(7, 5))
  np.save(tmp_path / "p1.npy", x)
  out = bags.load_bag(tmp_path / "p1.npy", patient_id="p1")
  assert out.dtype == np.float32
  np.testing.assert_allclose(out, x, rtol=1e-6)


@pytest.mark.parametrize("case", ["truncated", "bad_header_len", "bad_json", "bad_dtype",
                                  "size_mismatch", "hole"])
def test_corrupt_safetensors_errors_name_patient_and_file(tmp_path, case):
  x = np.ones((4, 3), "<f4")
  path = tmp_path / f"TCGA-XX-{case}.safetensors"
  if case == "truncated":
    _st_by_hand(path, [("f", "F32", (4, 3), x.tobytes())])
    path.write_bytes(path.read_bytes()[:-7])
  elif case == "bad_header_len":
    path.write_bytes(struct.pack("<Q", 10**6) + b"{}")
  elif case == "bad_json":
    path.write_bytes(struct.pack("<Q", 5) + b"{nope")
  elif case == "bad_dtype":
    _st_by_hand(path, [("f", "C64", (4, 3), x.tobytes())])
  elif case == "size_mismatch":
    _st_by_hand(path, [("f", "F32", (4, 4), x.tobytes())])
  elif case == "hole":
    raw = x.tobytes()
    header = {"f": {"dtype": "F32", "shape": [4, 3], "data_offsets": [4, 4 + len(raw)]}}
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"\0" * 4 + raw)
  with pytest.raises(bags.BagError) as err:
    bags.load_bag(path, patient_id="TCGA-XX")
  msg = str(err.value)
  assert "TCGA-XX" in msg and path.name in msg


def test_load_errors_name_patient_and_file(tmp_path):
  np.save(tmp_path / "rank3.npy", np.zeros((2, 3, 4), np.float32))
  with pytest.raises(bags.BagError, match=r"patient 'P7'.*rank3\.npy.*\[n_tiles"):
    bags.load_bag(tmp_path / "rank3.npy", patient_id="P7")
  np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
  with pytest.raises(bags.BagError, match=r"patient 'P8'.*obj\.npy"):
    bags.load_bag(tmp_path / "obj.npy", patient_id="P8")
  bad = np.ones((3, 2), np.float32)
  bad[1, 0] = np.nan
  np.save(tmp_path / "nan.npy", bad)
  with pytest.raises(bags.BagError, match=r"patient 'P9'.*nan\.npy.*tiles \[1\]"):
    bags.load_bag(tmp_path / "nan.npy", patient_id="P9")
  (tmp_path / "x.pt").write_bytes(b"")
  with pytest.raises(bags.BagError, match=r"'P1'.*x\.pt.*unsupported"):
    bags.load_bag(tmp_path / "x.pt", patient_id="P1")
  with pytest.raises(FileNotFoundError, match=r"'P2'.*missing\.npy"):
    bags.load_bag(tmp_path / "missing.npy", patient_id="P2")
  _st_by_hand(tmp_path / "two.safetensors", [("a", "F32", (1, 2), bad[:1].tobytes()),
                                            ("b", "F32", (1, 2), bad[:1].tobytes())])
  with pytest.raises(bags.BagError, match=r"'P3'.*two\.safetensors.*key="):
    bags.load_bag(tmp_path / "two.safetensors", patient_id="P3")
  with pytest.raises(bags.BagError, match=r"no tensor 'c'"):
    bags.load_bag(tmp_path / "two.safetensors", patient_id="P3", key="c")


def test_load_bags_concat_missing_and_dim_mismatch(tmp_path):
  rng = np.random.default_rng(2)
  a1, a2, b = rng.normal(size=(3, 4)), rng.normal(size=(2, 4)), rng.normal(size=(5, 4))
  np.save(tmp_path / "a1.npy", a1)
  np.save(tmp_path / "a2.npy", a2)
  _st_by_hand(tmp_path / "b.safetensors", [("features", "F32", b.shape,
                                            b.astype("<f4").tobytes())])
  np.save(tmp_path / "empty.npy", np.zeros((0, 4), np.float32))
  files = {"A": [tmp_path / "a1.npy", tmp_path / "a2.npy"], "B": str(tmp_path / "b.safetensors"),
           "C": tmp_path / "empty.npy", "D": None}
  out, presence = bags.load_bags(["A", "B", "C", "D", "E"], files)
  np.testing.assert_allclose(out[0], np.concatenate([a1, a2]), rtol=1e-6)
  np.testing.assert_allclose(out[1], b, rtol=1e-6)
  assert [o.shape for o in out[2:]] == [(0, 4)] * 3
  # A zero-tile bag is a missing modality, like no file at all.
  np.testing.assert_array_equal(presence, [True, True, False, False, False])

  np.save(tmp_path / "wrongdim.npy", np.zeros((2, 6), np.float32))
  with pytest.raises(bags.BagError, match=r"patient 'Z'.*wrongdim\.npy.*dim 6.*dim 4.*"
                                          r"patient 'A'.*a1\.npy"):
    bags.load_bags(["A", "Z"], {"A": tmp_path / "a1.npy", "Z": tmp_path / "wrongdim.npy"})


# ----------------------------------------------------------------------------
# Padding.


def test_pad_bags_values_and_masks():
  rng = np.random.default_rng(3)
  b = [rng.normal(size=(3, 2)), None, rng.normal(size=(5, 2)), np.zeros((0, 2))]
  x, m = bags.pad_bags(b)
  assert x.shape == (4, 5, 2) and x.dtype == np.float32 and m.dtype == bool
  np.testing.assert_array_equal(m.sum(1), [3, 0, 5, 0])
  np.testing.assert_allclose(x[0, :3], b[0], rtol=1e-6)
  np.testing.assert_allclose(x[2], b[2], rtol=1e-6)
  assert not x[0, 3:].any() and not x[1].any() and not x[3].any()
  x, m = bags.pad_bags(b, 8)
  assert x.shape == (4, 8, 2) and m[:, 5:].sum() == 0
  x, m = bags.pad_bags([None, np.zeros((0, 3))], dim=3)
  assert x.shape == (2, 1, 3) and not m.any()


def test_pad_bags_subsampling_is_deterministic_and_ordered():
  big = np.arange(40, dtype=np.float32).reshape(20, 2)
  small = np.ones((3, 2), np.float32)
  x1, m1 = bags.pad_bags([big, small], 6, rng=7)
  x2, _ = bags.pad_bags([big, small], 6, rng=np.random.default_rng(7))
  x3, _ = bags.pad_bags([big, small], 6, rng=8)
  np.testing.assert_array_equal(x1, x2)
  assert not np.array_equal(x1, x3)
  assert m1[0].all() and m1[1].sum() == 3
  rows = x1[0, :, 0] / 2  # Original row numbers of the kept tiles.
  assert len(set(rows)) == 6 and np.all(np.diff(rows) > 0)  # Distinct, original order.
  np.testing.assert_array_equal(x1[0], big[rows.astype(int)])
  with pytest.raises(ValueError, match=r"patient 'big'.*20 tiles exceed max_tiles=6.*rng"):
    bags.pad_bags([big, small], 6, patient_ids=["big", "small"])


def test_pad_bags_errors():
  with pytest.raises(ValueError, match=r"patient 'q'.*dim 3 differs from dim 2.*patient 'p'"):
    bags.pad_bags([np.ones((2, 2)), np.ones((2, 3))], patient_ids=["p", "q"])
  with pytest.raises(ValueError, match=r"bag 0.*\[n_tiles, dim\]"):
    bags.pad_bags([np.ones(3)])
  with pytest.raises(ValueError, match="every bag is empty"):
    bags.pad_bags([None, None])
  x, m = bags.pad_bags([None, np.zeros((0, 2))])  # dim from the empty [0, 2] bag.
  assert x.shape == (2, 1, 2) and not m.any()
  with pytest.raises(ValueError, match="max_tiles"):
    bags.pad_bags([np.ones((2, 2))], 0)


# ----------------------------------------------------------------------------
# Synthetic bags.


def _ids(n):
  return [f"TCGA-{i:04d}" for i in range(n)]


def test_synthetic_bags_deterministic_per_patient_not_cohort():
  ids = _ids(30)
  labels = [str(i % 5) for i in range(30)]
  kw = dict(n_tiles_range=(5, 20), dim=8, seed=11)
  full = bags.synthetic_bags(labels, patient_ids=ids, **kw)
  again = bags.synthetic_bags(labels, patient_ids=ids, **kw)
  for a, b in zip(full.bags, again.bags):
    np.testing.assert_array_equal(a, b)
  # A reversed subset (other patients, other order) gives each patient the same bag.
  sub = list(range(0, 30, 3))[::-1]
  part = bags.synthetic_bags([labels[i] for i in sub], patient_ids=[ids[i] for i in sub], **kw)
  for j, i in enumerate(sub):
    np.testing.assert_array_equal(part.bags[j], full.bags[i])
    np.testing.assert_array_equal(part.proportions[j], full.proportions[i])
  # Labels 2, 2.0 and "2" are one label.
  num = bags.synthetic_bags([int(l) for l in labels], patient_ids=ids, **kw)
  np.testing.assert_array_equal(num.bags[7], full.bags[7])
  # Changing one patient's label changes its bag only; another seed changes all.
  changed = list(labels)
  changed[4] = "0" if labels[4] != "0" else "1"
  other = bags.synthetic_bags(changed, patient_ids=ids, **kw)
  assert not np.array_equal(other.proportions[4], full.proportions[4])
  for i in set(range(30)) - {4}:
    np.testing.assert_array_equal(other.bags[i], full.bags[i])
  reseeded = bags.synthetic_bags(labels, patient_ids=ids, **{**kw, "seed": 12})
  assert not any(np.array_equal(a, b) for a, b in zip(reseeded.bags, full.bags)
                 if a.shape == b.shape)


def test_synthetic_bags_structure():
  ids = _ids(60)
  sb = bags.synthetic_bags(["0"] * 30 + ["1"] * 30, patient_ids=ids, n_tiles_range=(40, 80),
                           dim=48, seed=0, rare_high_risk={"1": 0.05})
  assert sb.phenotype_names == ("tumour", "stroma", "necrosis", "lymphocytes", "fat",
                                "background", "high_risk")
  n = np.array([b.shape[0] for b in sb.bags])
  assert n.min() >= 40 and n.max() <= 80 and all(b.shape[1] == 48 for b in sb.bags)
  np.testing.assert_allclose(sb.proportions.sum(1), 1.0)
  rare = np.array([(t == 6).sum() for t in sb.tile_phenotype])
  np.testing.assert_array_equal(rare[:30], 0)
  np.testing.assert_array_equal(rare[30:], np.maximum(1, np.round(0.05 * n[30:])))
  # Tiles sit around their phenotype mean: means ~ N(0, I) are ~sqrt(2 * 48)
  # apart against unit tile noise, so each tile is nearest to its own
  # phenotype's centroid (estimated from the data).
  x = np.concatenate(sb.bags)
  t = np.concatenate(sb.tile_phenotype)
  cent = np.stack([x[t == k].mean(0) for k in range(7)])
  nearest = np.argmin(((x[:, None, :] - cent[None]) ** 2).sum(-1), axis=1)
  assert (nearest == t).mean() > 0.95
  # Tile phenotype counts follow the patient's proportions (multinomial draw).
  counts = np.stack([np.bincount(tp[tp < 6], minlength=6) for tp in sb.tile_phenotype])
  expected = sb.proportions * counts.sum(1, keepdims=True)
  chi2 = ((counts - expected) ** 2 / np.maximum(expected, 1e-9)).sum()
  assert chi2 < 2 * counts.size  # ~counts.size under the model.


def test_synthetic_bags_depend_on_label_noise_bags_do_not():
  rng = np.random.default_rng(0)
  n = 250
  labels = rng.choice(["0", "1", "2", "3", "4"], size=n, p=[0.55, 0.06, 0.17, 0.17, 0.05])
  ids = _ids(n)
  kw = dict(n_tiles_range=(20, 60), dim=16, seed=3)
  info = bags.synthetic_bags(labels, patient_ids=ids, **kw)
  noise = bags.noise_bags(ids, **kw)
  majority = max(np.mean(labels == l) for l in set(labels))

  def cv_accuracy(sb):
    feats = np.stack([b.mean(0) for b in sb.bags])  # Mean-pooled bag embedding.
    clf = LogisticRegression(max_iter=2000)
    return cross_val_score(clf, feats, labels, cv=5).mean()

  acc_info, acc_noise = cv_accuracy(info), cv_accuracy(noise)
  assert acc_info > majority + 0.15, (acc_info, majority)
  assert acc_noise < majority + 0.05, (acc_noise, majority)
  # Per-phenotype proportions differ across labels (Kruskal-Wallis), not for noise.
  for sb, informative in ((info, True), (noise, False)):
    pvals = [stats.kruskal(*[sb.proportions[labels == l, k] for l in sorted(set(labels))]).pvalue
             for k in range(6)]
    if informative:
      assert min(pvals) < 1e-6
    else:
      assert min(pvals) > 1e-3 / 6
  # label_effect=0: every label shares one concentration (no information).
  flat = bags.synthetic_bags(labels, patient_ids=ids, label_effect=0.0, **kw)
  assert len(set(flat.concentration.values())) == 1


def test_site_shift_and_errors():
  ids = _ids(4)
  kw = dict(patient_ids=ids, n_tiles_range=(5, 5), dim=6, seed=1)
  plain = bags.synthetic_bags(["0"] * 4, **kw)
  same = bags.synthetic_bags(["0"] * 4, sites=["A", "A", "B", "B"], **kw)
  for a, b in zip(plain.bags, same.bags):
    np.testing.assert_array_equal(a, b)  # No shift requested: no change.
  shifted = bags.synthetic_bags(["0"] * 4, sites=["A", "A", "B", "B"], site_shift=2.0, **kw)
  d = [s - p for s, p in zip(shifted.bags, plain.bags)]
  np.testing.assert_allclose(d[0], d[1][:1].repeat(5, 0), atol=1e-5)  # One shift per site.
  assert np.abs(d[0][0] - d[2][0]).max() > 0.5
  with pytest.raises(ValueError, match="duplicate"):
    bags.synthetic_bags(["0", "1"], patient_ids=["a", "a"])
  with pytest.raises(ValueError, match="patient 'b' has a missing label"):
    bags.synthetic_bags(["0", None], patient_ids=["a", "b"])
  with pytest.raises(ValueError, match="no entry for label '1'"):
    bags.synthetic_bags(["0", "1"], patient_ids=["a", "b"], concentration={"0": [1.0] * 6})
  with pytest.raises(ValueError, match="n_tiles_range"):
    bags.synthetic_bags(["0"], patient_ids=["a"], n_tiles_range=(5, 2))
  empty = bags.synthetic_bags(["0", "1"], patient_ids=["a", "b"], n_tiles_range=(0, 0), dim=3)
  x, m = empty.pad()
  assert x.shape == (2, 1, 3) and not m.any()
