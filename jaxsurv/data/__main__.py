"""Command line of the data layer: prepare a cohort once as a TFDS dataset, list cohorts.

Usage::

  python -m jaxsurv.data list [--data-dir DIR]
  python -m jaxsurv.data prepare NAME [--n-patients N] [--seed S] [--grid 64 | --grid D H W]
      [--spacing-mm 1] [--fov-mm 96 | --fov-mm none] [--margin-mm 10] [--n4]
      [--mask-to-periphery] [--periphery-mm 10] [--data-dir DIR] [--workers 1]
      [--missing-images error|absent] [--force] [--no-progress]
  python -m jaxsurv.data prepare path/to/manifest.csv --spec spec.json [...]
  python -m jaxsurv.data manifest NAME --out FILE.csv [--n-patients N] [--seed S]
      [--splits RUN/splits.json --part test] [--drop-outcomes]

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

import argparse
import dataclasses
import json
import pathlib
import sys

_PREPROCESS_FLAGS = ("grid", "spacing_mm", "fov_mm", "margin_mm", "n4", "mask_to_periphery",
                     "periphery_mm")


def _fov(text: str):
  if text.lower() in ("none", "off"):
    return "none"
  try:
    return float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"--fov-mm: expected millimetres or 'none', got {text!r}") from None


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m jaxsurv.data", description=__doc__.split("\n\n")[0],
                              epilog="See the module docstrings of jaxsurv.data.__main__ and "
                                     "jaxsurv.data.prepare for details.")
  sub = p.add_subparsers(dest="command", required=True)

  ls = sub.add_parser("list", help="list known cohorts and the datasets prepared in --data-dir")
  ls.add_argument("--data-dir", type=pathlib.Path, default=None,
                  help="TFDS data folder (default: $JAXSURV_CACHE/tfds)")

  pr = sub.add_parser(
      "prepare", help="validate, preprocess and write a cohort as a TFDS dataset",
      formatter_class=argparse.RawDescriptionHelpFormatter,
      description="Prepares NAME once as a TFDS ArrayRecord dataset (reused when the same "
                  "version exists).",
      epilog="Manifest cohorts need --spec FILE.json with CohortSpec fields, e.g.\n"
             '  {"channels": ["t1c", "t2fs"], "mask": "mask", "numeric": ["age"],\n'
             '   "categorical": ["grade"], "outcomes": ["os"]}\n'
             "Preprocessing flags override the cohort's default settings "
             "(rotterdam_rendered: fixed 96 mm field of view).")
  pr.add_argument("name", help="known cohort (see `list`) or a manifest CSV path")
  pr.add_argument("--spec", type=pathlib.Path, default=None,
                  help="JSON CohortSpec file (manifest cohorts only)")
  pr.add_argument("--n-patients", type=int, default=None,
                  help="demo cohorts: patients to generate (default 300 sarcoma_phantom, all "
                       "2982 rotterdam_rendered)")
  pr.add_argument("--seed", type=int, default=0, help="demo cohorts: generator seed (default 0)")
  pr.add_argument("--grid", type=int, nargs="+", default=None, metavar="N",
                  help="output grid in voxels: one value (cube) or D H W")
  pr.add_argument("--spacing-mm", type=float, default=None,
                  help="isotropic intermediate resampling (mm)")
  pr.add_argument("--fov-mm", type=_fov, default=None,
                  help="fixed field of view (mm) centred on the tumour, or 'none' for "
                       "bounding box + margin")
  pr.add_argument("--margin-mm", type=float, default=None, help="margin around the mask's box (mm)")
  pr.add_argument("--n4", action="store_true", default=None, help="N4 bias-field correction")
  pr.add_argument("--mask-to-periphery", action="store_true", default=None,
                  help="zero voxels beyond the tumour dilated by --periphery-mm")
  pr.add_argument("--periphery-mm", type=float, default=None, help="tumour dilation (mm)")
  pr.add_argument("--data-dir", type=pathlib.Path, default=None,
                  help="TFDS data folder (default: $JAXSURV_CACHE/tfds)")
  pr.add_argument("--workers", type=int, default=1, help="preprocessing processes (default 1)")
  pr.add_argument("--missing-images", choices=("error", "absent"), default="error",
                  help="an image path pointing to no file: validation error (default) or keep "
                       "the patient with image_present=False")
  pr.add_argument("--force", action="store_true", help="delete and rewrite an existing version")
  pr.add_argument("--no-progress", action="store_true", help="no progress bars")
  mn = sub.add_parser(
      "manifest", help="write a demo cohort's manifest (absolute paths), e.g. for predict",
      description="Writes the manifest of a demo cohort with absolute image paths, optionally "
                  "one part of a run's splits.json and without outcomes.")
  mn.add_argument("name", help="demo cohort: sarcoma_phantom or rotterdam_rendered")
  mn.add_argument("--out", type=pathlib.Path, required=True, help="CSV file to write")
  mn.add_argument("--n-patients", type=int, default=None,
                  help="patients of the demo cohort (as given to prepare / the run's config)")
  mn.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
  mn.add_argument("--splits", type=pathlib.Path, default=None,
                  help="a run's splits.json: keep only the patients of --part")
  mn.add_argument("--part", default="test", choices=("train", "val", "test"),
                  help="part of --splits to keep (default test)")
  mn.add_argument("--drop-outcomes", action="store_true",
                  help="drop outcome, oracle, latent and render columns (label-free manifest)")
  mn.add_argument("--no-progress", action="store_true", help="no progress bar while rendering")
  return p


def _preprocess_from_args(args, name: str, spec):
  """The cohort's default PreprocessConfig with the given flags applied (None if no images)."""
  from jaxsurv.data import prepare  # pylint: disable=import-outside-toplevel
  given = {k: getattr(args, k) for k in _PREPROCESS_FLAGS if getattr(args, k) is not None}
  has_images = bool(spec.channels) if spec is not None else prepare.default_preprocess(name) is not None
  if not has_images:
    if given:
      raise SystemExit(f"error: cohort {name!r} has no images; preprocessing flags "
                       f"{sorted('--' + k.replace('_', '-') for k in given)} do not apply")
    return None
  base = prepare.default_preprocess(name) if spec is None else prepare.DEFAULT_PREPROCESS
  if "grid" in given:
    g = given["grid"]
    if len(g) not in (1, 3):
      raise SystemExit(f"error: --grid takes 1 or 3 integers, got {g}")
    given["grid"] = tuple(g * 3 if len(g) == 1 else g)
  if given.get("fov_mm") == "none":
    given["fov_mm"] = None
  try:
    return dataclasses.replace(base, **given)
  except ValueError as e:
    raise SystemExit(f"error: {e}") from None


def _human(n: int) -> str:
  for unit in ("B", "KiB", "MiB", "GiB"):
    if n < 1024 or unit == "GiB":
      return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
    n /= 1024
  return f"{n} B"


def _cmd_list(args) -> int:
  from jaxsurv.data import prepare  # pylint: disable=import-outside-toplevel
  print("known cohorts:")
  for name, kind, desc in prepare.describe_known_cohorts():
    print(f"  {name:<20} {kind:<14} {desc}")
  print("  <manifest.csv>       image/tabular  your own cohort: prepare PATH --spec SPEC.json")
  rows = prepare.list_prepared(args.data_dir)
  where = args.data_dir or "$JAXSURV_CACHE/tfds"
  print(f"prepared in {where}: {len(rows) or 'none'}")
  for r in rows:
    print(f"  {r['config']} (v{r['version']}): {r['n_patients']} patients, {_human(r['bytes'])}")
  return 0


def _cmd_prepare(args) -> int:
  from jaxsurv.data import manifest as mf  # pylint: disable=import-outside-toplevel
  from jaxsurv.data import prepare  # pylint: disable=import-outside-toplevel
  spec = None
  if args.spec is not None:
    if args.name in prepare.KNOWN_COHORTS:
      raise SystemExit(f"error: --spec applies to manifest paths, not the known cohort {args.name!r}")
    try:
      spec = prepare.spec_from_json(json.loads(args.spec.read_text()))
    except (OSError, ValueError, TypeError) as e:
      raise SystemExit(f"error: --spec {args.spec}: {e}") from None
  elif args.name not in prepare.KNOWN_COHORTS:
    raise SystemExit(f"error: {args.name!r} is not a known cohort {list(prepare.KNOWN_COHORTS)}; "
                     "a manifest path needs --spec FILE.json")
  preprocess = _preprocess_from_args(args, args.name, spec)
  try:
    dataset_dir, reused = prepare.prepare_dataset(
        args.name, spec=spec, preprocess=preprocess, data_dir=args.data_dir,
        n_patients=args.n_patients, seed=args.seed, force=args.force,
        missing_images=args.missing_images, workers=args.workers, progress=not args.no_progress)
  except (mf.CohortValidationError, prepare.PreprocessingError, ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  rows = [r for r in prepare.list_prepared(dataset_dir.parents[2]) if r["dataset_dir"] == dataset_dir]
  n = rows[0]["n_patients"] if rows else "?"
  print(f"{'reused' if reused else 'prepared'} {args.name}: {n} patients, "
        f"{_human(prepare.dataset_bytes(dataset_dir))} in {dataset_dir}")
  if preprocess is not None:
    print(f"preprocessing fingerprint {preprocess.fingerprint()}: grid {preprocess.grid}, "
          f"spacing {preprocess.spacing_mm} mm, fov {preprocess.fov_mm or 'mask box + margin'}")
  return 0


def _cmd_manifest(args) -> int:
  """Writes a demo cohort's manifest (see the module docstring)."""
  from jaxsurv.data import manifest as mf  # pylint: disable=import-outside-toplevel
  from jaxsurv.data import phantom  # pylint: disable=import-outside-toplevel
  from jaxsurv.data import prepare  # pylint: disable=import-outside-toplevel
  from jaxsurv.data import splits as splits_lib  # pylint: disable=import-outside-toplevel
  if args.name not in prepare.DEMO_COHORTS:
    raise SystemExit(f"error: {args.name!r} is not a demo cohort {list(prepare.DEMO_COHORTS)}")
  spec = prepare.cohort_spec(args.name)
  try:
    path = prepare.demo_manifest(args.name, args.n_patients, args.seed,
                                 progress=not args.no_progress)
    df = mf.read_manifest(path, spec)
    if args.splits is not None:
      split = splits_lib.load_splits(args.splits)
      if isinstance(split, list):
        raise ValueError(f"{args.splits}: holds {len(split)} folds; give a single run's splits.json")
      ids = list(getattr(split, args.part))
      known = set(df[spec.id_column])
      unknown = [i for i in ids if i not in known]
      if unknown:
        raise ValueError(f"{args.splits}: {len(unknown)} patients of part {args.part!r} are not "
                         f"in {args.name} (seed {args.seed}, n_patients {args.n_patients}), "
                         f"e.g. {unknown[:3]}")
      df = df.set_index(spec.id_column, drop=False).loc[ids].reset_index(drop=True)
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if args.drop_outcomes:
    df = df[[c for c in df.columns
             if c not in spec.outcome_columns and not phantom.is_non_model_column(c)]]
  mf.write_manifest(df.to_dict("records"), args.out)
  print(f"wrote {args.out}: {len(df)} patients, columns {list(df.columns)}")
  return 0


def main(argv=None) -> int:
  args = _parser().parse_args(argv)
  if args.command == "list":
    return _cmd_list(args)
  if args.command == "manifest":
    return _cmd_manifest(args)
  return _cmd_prepare(args)


if __name__ == "__main__":  # Guard: worker processes (spawn) re-import this module.
  sys.exit(main())
