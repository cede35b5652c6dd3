"""Command line of the data layer: prepare a cohort once as a TFDS dataset, list cohorts.

Usage::

  python -m jaxsurv.data list [--data-dir DIR]
  python -m jaxsurv.data prepare NAME [--n-patients N] [--seed S] [--grid 64 | --grid D,H,W]
      [--spacing-mm 1] [--fov-mm 96 | --fov-mm none] [--margin-mm 10] [--n4]
      [--mask-to-periphery] [--periphery-mm 10] [--data-dir DIR] [--workers 1]
      [--missing-images error|absent] [--force] [--no-progress]
  python -m jaxsurv.data prepare path/to/manifest.csv --spec spec.json [...]
  python -m jaxsurv.data manifest NAME --out FILE.csv [--n-patients N] [--seed S]
      [--splits RUN/splits.json --part test] [--drop-outcomes]

The options are absl flags (``--flag value`` or ``--flag=value``); a flag
of another command is refused. ``--grid`` takes one size (a cube) or three
comma-separated sizes ``D,H,W``. Errors end as ``jaxsurv.cli`` describes: one
message and exit status 2 for bad input (``--debug``: the traceback).

``NAME`` is a known cohort (``sarcoma_phantom``, ``rotterdam_rendered``,
``rotterdam``, ``gbsg``, ``tcga_brca``, ``breast_cancer``) or a manifest CSV
path. A manifest needs ``--spec``, a JSON file whose keys are
``jaxsurv.data.manifest.CohortSpec`` fields, e.g.::

  {"channels": ["t1c", "t2fs"], "mask": "mask", "numeric": ["age"],
   "categorical": ["grade"], "outcomes": ["os"],
   "categorical_levels": {"grade": ["1", "2", "3"]}}

(missing keys take ``CohortSpec``'s defaults; ``"channels": []`` and
``"mask": null`` declare a table-only cohort).

Preprocessing flags start from the cohort's default settings
(``jaxsurv.data.prepare.default_preprocess``: rotterdam_rendered uses a fixed
96 mm field of view so tumour size stays visible; other image cohorts use
``DEFAULT_PREPROCESS``, a 64^3 tumour-centred crop) and override single
fields. Tabular cohorts take no preprocessing flags. Each distinct setting
prepares its own dataset version (the config name carries the settings'
fingerprint); an existing version is reused unless ``--force``.

Prints where the dataset went, its patient count and size on disk.

``manifest`` writes a demo cohort's manifest (``sarcoma_phantom``,
``rotterdam_rendered``; rendered first if needed) with absolute image paths,
optionally only the patients of one part of a run's ``splits.json`` and
without the outcome columns (``<outcome>_time``, ``<outcome>_event``) and
the demo's oracle, latent and render columns: a "new patients" manifest for
``python -m jaxsurv.predict``.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import sys
from typing import Sequence

from absl import app, flags

from jaxsurv import cli
from jaxsurv.errors import UserError

COMMANDS = ("list", "prepare", "manifest", "input")
_PREPROCESS_FLAGS = ("grid", "spacing_mm", "fov_mm", "margin_mm", "n4", "mask_to_periphery",
                     "periphery_mm")
# The flags each command takes (absl flags are one namespace; the others are refused).
_COMMAND_FLAGS = {
    "list": ("data-dir",),
    "prepare": ("spec", "n-patients", "seed", "grid", "spacing-mm", "fov-mm", "margin-mm", "n4",
                "mask-to-periphery", "periphery-mm", "data-dir", "workers", "missing-images",
                "force", "no-progress"),
    "manifest": ("out", "n-patients", "seed", "splits", "part", "drop-outcomes", "no-progress"),
    "input": ("out", "seed", "part", "drop-modalities"),
}


def define_flags(fv: flags.FlagValues, argv: Sequence[str] | None = None) -> None:
  """Defines the command's absl flags on ``fv`` (``jaxsurv.cli.run`` / ``cli.call``)."""
  del argv
  f = dict(flag_values=fv)
  flags.DEFINE_string("data-dir", None, "list, prepare: TFDS data folder (default: "
                      "$JAXSURV_CACHE/tfds)", **f)
  flags.DEFINE_string("spec", None, "prepare: JSON CohortSpec file (manifest cohorts only)", **f)
  flags.DEFINE_integer("n-patients", None,
                       "prepare, manifest: demo cohorts: patients to generate (default 300 "
                       "sarcoma_phantom, all 2982 rotterdam_rendered)", **f)
  flags.DEFINE_integer("seed", 0, "prepare, manifest: demo cohort generator seed", **f)
  flags.DEFINE_list("grid", None, "prepare: output grid in voxels: one value (cube) or D,H,W",
                    **f)
  flags.DEFINE_float("spacing-mm", None, "prepare: isotropic intermediate resampling (mm)", **f)
  flags.DEFINE_string("fov-mm", None, "prepare: fixed field of view (mm) centred on the tumour, "
                      "or 'none' for bounding box + margin", **f)
  flags.DEFINE_float("margin-mm", None, "prepare: margin around the mask's box (mm)", **f)
  flags.DEFINE_boolean("n4", None, "prepare: N4 bias-field correction", **f)
  flags.DEFINE_boolean("mask-to-periphery", None,
                       "prepare: zero voxels beyond the tumour dilated by --periphery-mm", **f)
  flags.DEFINE_float("periphery-mm", None, "prepare: tumour dilation (mm)", **f)
  flags.DEFINE_integer("workers", 1, "prepare: preprocessing processes", lower_bound=1, **f)
  flags.DEFINE_enum("missing-images", "error", ["error", "absent"],
                    "prepare: an image path pointing to no file: validation error (default) or "
                    "keep the patient with image_present=False", **f)
  flags.DEFINE_boolean("force", False, "prepare: delete and rewrite an existing version", **f)
  flags.DEFINE_boolean("no-progress", False, "prepare, manifest: no progress bars", **f)
  flags.DEFINE_string("out", None, "manifest: CSV file to write (required)", **f)
  flags.DEFINE_string("splits", None, "manifest: a run's splits.json: keep only the patients of "
                      "--part", **f)
  flags.DEFINE_enum("part", "test", ["train", "val", "test"],
                    "manifest: part of --splits to keep", **f)
  flags.DEFINE_boolean("drop-outcomes", False, "manifest: drop outcome, oracle, latent and "
                       "render columns (label-free manifest)", **f)
  flags.DEFINE_list("drop-modalities", None, "input: MODALITY:P,... remove each modality per "
                    "patient with probability P (never all of a patient's)", **f)


def _value(fv: flags.FlagValues, name: str):
  return fv[name].value


def _path(fv: flags.FlagValues, name: str) -> pathlib.Path | None:
  v = fv[name].value
  return None if v is None else pathlib.Path(v)


def _fov(text: str):
  if text.lower() in ("none", "off"):
    return None
  try:
    return float(text)
  except ValueError:
    raise UserError(f"--fov-mm: expected millimetres or 'none', got {text!r}") from None


def _preprocess_from_flags(fv: flags.FlagValues, name: str, spec):
  """The cohort's default PreprocessConfig with the given flags applied (None if no images).

  Raises:
    UserError: preprocessing flags for a cohort without images, a bad
      ``--grid`` or ``--fov-mm``, or settings ``PreprocessConfig`` rejects.
  """
  from jaxsurv.data import prepare  # pylint: disable=import-outside-toplevel
  given = {k: fv[k.replace("_", "-")].value for k in _PREPROCESS_FLAGS
           if fv[k.replace("_", "-")].present}
  has_images = bool(spec.channels) if spec is not None else prepare.default_preprocess(name) is not None
  if not has_images:
    if given:
      raise UserError(f"cohort {name!r} has no images; preprocessing flags "
                      f"{sorted('--' + k.replace('_', '-') for k in given)} do not apply")
    return None
  base = prepare.default_preprocess(name) if spec is None else prepare.DEFAULT_PREPROCESS
  if "grid" in given:
    g = given["grid"]
    try:
      g = [int(x) for x in g]
    except ValueError:
      raise UserError(f"--grid: expected integers, got {','.join(g)}") from None
    if len(g) not in (1, 3):
      raise UserError(f"--grid takes 1 or 3 integers (D,H,W), got {g}")
    given["grid"] = tuple(g * 3 if len(g) == 1 else g)
  if "fov_mm" in given:
    given["fov_mm"] = _fov(given["fov_mm"])
  try:
    return dataclasses.replace(base, **given)
  except ValueError as e:
    raise UserError(str(e)) from e


def _human(n: int) -> str:
  for unit in ("B", "KiB", "MiB", "GiB"):
    if n < 1024 or unit == "GiB":
      return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
    n /= 1024
  return f"{n} B"


def _cmd_list(fv: flags.FlagValues) -> int:
  from jaxsurv.data import prepare  # pylint: disable=import-outside-toplevel
  print("known cohorts:")
  for name, kind, desc in prepare.describe_known_cohorts():
    print(f"  {name:<20} {kind:<14} {desc}")
  print("  <manifest.csv>       image/tabular  your own cohort: prepare PATH --spec SPEC.json")
  data_dir = _path(fv, "data-dir")
  rows = prepare.list_prepared(data_dir)
  where = data_dir or "$JAXSURV_CACHE/tfds"
  print(f"prepared in {where}: {len(rows) or 'none'}")
  for r in rows:
    print(f"  {r['config']} (v{r['version']}): {r['n_patients']} patients, {_human(r['bytes'])}")
  return 0


def _cmd_prepare(name: str, fv: flags.FlagValues) -> int:
  """Prepares ``name`` (see the module docstring).

  Raises:
    UserError: a bad ``--spec``, an unknown cohort, bad preprocessing flags,
      or what ``prepare.prepare_dataset`` rejects (an invalid manifest or
      cohort, failed preprocessing, a missing file).
  """
  from jaxsurv.data import manifest as mf  # pylint: disable=import-outside-toplevel
  from jaxsurv.data import prepare  # pylint: disable=import-outside-toplevel
  spec = None
  spec_path = _path(fv, "spec")
  if spec_path is not None:
    if name in prepare.KNOWN_COHORTS:
      raise UserError(f"--spec applies to manifest paths, not the known cohort {name!r}")
    try:
      spec = prepare.spec_from_json(json.loads(spec_path.read_text()))
    except (OSError, ValueError, TypeError) as e:
      raise UserError(f"--spec {spec_path}: {e}") from e
  elif name not in prepare.KNOWN_COHORTS:
    raise UserError(f"{name!r} is not a known cohort {list(prepare.KNOWN_COHORTS)}; "
                    "a manifest path needs --spec FILE.json")
  preprocess = _preprocess_from_flags(fv, name, spec)
  try:
    dataset_dir, reused = prepare.prepare_dataset(
        name, spec=spec, preprocess=preprocess, data_dir=_path(fv, "data-dir"),
        n_patients=_value(fv, "n-patients"), seed=fv.seed, force=fv.force,
        missing_images=_value(fv, "missing-images"), workers=fv.workers,
        progress=not _value(fv, "no-progress"))
  except (mf.CohortValidationError, prepare.PreprocessingError, ValueError) as e:
    raise UserError(str(e)) from e
  rows = [r for r in prepare.list_prepared(dataset_dir.parents[2]) if r["dataset_dir"] == dataset_dir]
  n = rows[0]["n_patients"] if rows else "?"
  print(f"{'reused' if reused else 'prepared'} {name}: {n} patients, "
        f"{_human(prepare.dataset_bytes(dataset_dir))} in {dataset_dir}")
  if preprocess is not None:
    print(f"preprocessing fingerprint {preprocess.fingerprint()}: grid {preprocess.grid}, "
          f"spacing {preprocess.spacing_mm} mm, fov {preprocess.fov_mm or 'mask box + margin'}")
  return 0


def _cmd_manifest(name: str, fv: flags.FlagValues) -> int:
  """Writes a demo cohort's manifest (see the module docstring).

  Raises:
    UserError: not a demo cohort, no ``--out``, or a ``--splits`` file that
      cannot be read, holds folds, or names patients the cohort lacks.
  """
  from jaxsurv.data import manifest as mf  # pylint: disable=import-outside-toplevel
  from jaxsurv.data import phantom  # pylint: disable=import-outside-toplevel
  from jaxsurv.data import prepare  # pylint: disable=import-outside-toplevel
  from jaxsurv.data import splits as splits_lib  # pylint: disable=import-outside-toplevel
  if name not in prepare.DEMO_COHORTS:
    raise UserError(f"{name!r} is not a demo cohort {list(prepare.DEMO_COHORTS)}")
  out = _path(fv, "out")
  if out is None:
    raise UserError("manifest: --out FILE.csv is required")
  n_patients, splits_path, part = _value(fv, "n-patients"), _path(fv, "splits"), fv.part
  spec = prepare.cohort_spec(name)
  try:
    path = prepare.demo_manifest(name, n_patients, fv.seed, progress=not _value(fv, "no-progress"))
    df = mf.read_manifest(path, spec)
    if splits_path is not None:
      split = splits_lib.load_splits(splits_path)
      if isinstance(split, list):
        raise UserError(f"{splits_path}: holds {len(split)} folds; give a single run's "
                        "splits.json")
      ids = list(getattr(split, part))
      known = set(df[spec.id_column])
      unknown = [i for i in ids if i not in known]
      if unknown:
        raise UserError(f"{splits_path}: {len(unknown)} patients of part {part!r} are not "
                        f"in {name} (seed {fv.seed}, n_patients {n_patients}), "
                        f"e.g. {unknown[:3]}")
      df = df.set_index(spec.id_column, drop=False).loc[ids].reset_index(drop=True)
  except UserError:
    raise
  except ValueError as e:
    raise UserError(str(e)) from e
  if _value(fv, "drop-outcomes"):
    df = df[[c for c in df.columns
             if c not in spec.outcome_columns and not phantom.is_non_model_column(c)]]
  mf.write_manifest(df.to_dict("records"), out)
  print(f"wrote {out}: {len(df)} patients, columns {list(df.columns)}")
  return 0


def _cmd_input(run_dir: str, fv: flags.FlagValues) -> int:
  """Writes a fusion run's ``--part`` patients as label-free input for predict.

  Raises:
    UserError: no ``--out``, a malformed ``--drop-modalities``, or see
      ``jaxsurv.fusion_predict.write_label_free_input``.
  """
  from jaxsurv import fusion_predict  # pylint: disable=import-outside-toplevel
  out = _path(fv, "out")
  if out is None:
    raise UserError("input: --out FOLDER is required")
  drop = {}
  for item in _value(fv, "drop-modalities") or []:
    name, _, prob = item.partition(":")
    try:
      drop[name] = float(prob)
    except ValueError:
      raise UserError(f"--drop-modalities: expected MODALITY:P, got {item!r}") from None
  table = fusion_predict.write_label_free_input(run_dir, out, part=fv.part, drop=drop,
                                                seed=fv.seed)
  counts = {c[len("present_"):]: int(table[c].sum()) for c in table.columns
            if c.startswith("present_")}
  print(f"wrote {out}: {len(table)} patients of part {fv.part!r}, present per modality {counts}")
  return 0


def _main(argv: Sequence[str], fv: flags.FlagValues) -> int:
  """Runs ``list``, ``prepare NAME``, ``manifest NAME`` or ``input RUN`` on parsed flags.

  Raises:
    absl.app.UsageError: no or an unknown command, a missing or extra NAME,
      or a flag of another command.
    UserError: see the commands.
  """
  rest = list(argv[1:])
  if not rest or rest[0] not in COMMANDS:
    raise app.UsageError(f"expected a command, one of {list(COMMANDS)}; got {rest}")
  command, names = rest[0], rest[1:]
  wanted = 0 if command == "list" else 1
  if len(names) != wanted:
    what = "no NAME" if wanted == 0 else "one NAME (a cohort or manifest path)"
    hint = " (give --grid as D,H,W)" if command == "prepare" and fv["grid"].present else ""
    raise app.UsageError(f"{command} takes {what}, got {names}{hint}")
  other = sorted({n for names_ in _COMMAND_FLAGS.values() for n in names_
                  if n not in _COMMAND_FLAGS[command] and fv[n].present})
  if other:
    raise app.UsageError(f"{command} does not take {', '.join('--' + n for n in other)}")
  if command == "list":
    return _cmd_list(fv)
  if command == "manifest":
    return _cmd_manifest(names[0], fv)
  if command == "input":
    return _cmd_input(names[0], fv)
  return _cmd_prepare(names[0], fv)


def main(argv: Sequence[str] | None = None) -> int:
  """In-process entry point: ``argv`` without the program name; returns the exit status.

  Ends as ``jaxsurv.cli.call`` does: 0 on success; 2 with one message on
  stderr for bad input or a missing file; 1 for a usage or flag error.

  Raises:
    Exceptions that are bugs (see ``jaxsurv.cli``).
  """
  return cli.call(_main, define_flags, sys.argv[1:] if argv is None else argv,
                  prog="python -m jaxsurv.data")


if __name__ == "__main__":  # Guard: worker processes (spawn) re-import this module.
  cli.run(_main, define_flags=define_flags)
