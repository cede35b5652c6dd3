"""Run folders that never lose or mix work.

A trainer's ``--workdir`` holds one run: its checkpoints and reports, and a
record of what trained them:

* ``run.json``: the resolved config (``config``), its fingerprint
  (``config_fingerprint``, over the fields that change what is trained, see
  :data:`IGNORED_FIELDS`), the cohort's fingerprint (``cohort_fingerprint``),
  the jaxsurv version, when the run was created and when its current config
  was recorded (``config_since``), and ``history``: one entry per earlier
  config the run continued from (``allow_changed=True``), oldest first:
  ``config_file`` (``config.<k>.json``), its fingerprints, ``since``,
  ``until`` and ``changes`` (the dotted ``field: old -> new`` lines).
* ``config.json``: the config of the latest training (the same dict as
  ``run.json``'s ``config``; ``jaxsurv.predict`` reads it).

:func:`open_run` is called by a trainer after the cohort and config have been
validated and before anything is written to the workdir. It creates the run,
or accepts the same run again (the trainer then resumes), and refuses, before
any work, a workdir that holds another run, another config or another
cohort, or files that are not a jaxsurv run.

:func:`refuse_output_near_runs` keeps commands that write (and with
``--overwrite`` delete) an output folder away from run folders.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import pathlib
import tempfile
from typing import Any, Iterable, Mapping

from jaxsurv import distributed
from jaxsurv.errors import UserError

PathLike = str | os.PathLike

RUN_RECORD = "run.json"
CONFIG_FILE = "config.json"
FORMAT = 1

# Config fields that do not change what is trained, ignored when a workdir's
# config is compared with a new one (dotted paths): the progress bar, how often
# progress is logged, and how many processes prepare the cohort once (the
# prepared data is the same for any number).
# Fields that change how a run computes or reports, not what it computes
# (model.image.conv_impl and xla_cpu_convolutions: the same convolution up to
# float32 summation order),
# and the variable lists of ``python -m jaxsurv.compare``'s classical rows
# (``compare``), which no network run reads.
IGNORED_FIELDS = frozenset({"progress_bar", "log_every_steps", "data.prepare_workers",
                            "model.image.conv_impl", "xla_cpu_convolutions", "compare"})

_SHORT = 12  # Hex digits of a fingerprint shown in messages.


# ----------------------------------------------------------------------------
# Config data and fingerprints.
# ----------------------------------------------------------------------------


def config_to_dict(config) -> dict:
  """The resolved config as JSON-safe data (nested dicts, lists, str, numbers, None).

  Args:
    config: an ``ml_collections.ConfigDict`` / ``FrozenConfigDict``, or a
      mapping (converted through ``ConfigDict``).

  Returns:
    ``json.loads(config.to_json_best_effort())``: tuples become lists, field
    references are resolved, values JSON cannot hold become strings.

  Raises:
    TypeError, ValueError: ``config`` is neither a config nor a mapping.
  """
  if not hasattr(config, "to_json_best_effort"):
    import ml_collections  # pylint: disable=import-outside-toplevel
    config = ml_collections.ConfigDict(dict(config))
  return json.loads(config.to_json_best_effort())


def canonical_json(data: Any) -> str:
  """Sorted keys, no spaces, UTF-8 text: equal data gives equal text.

  Raises:
    TypeError: ``data`` holds a value JSON cannot encode.
  """
  return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def fingerprint(data: Any) -> str:
  """sha256 (hex) of :func:`canonical_json` of ``data``.

  Raises:
    TypeError: ``data`` holds a value JSON cannot encode.
  """
  return hashlib.sha256(canonical_json(data).encode("utf-8")).hexdigest()


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """``{"data": {"fold": 0}}`` -> ``{"data.fold": 0}`` (an empty mapping is kept as a leaf)."""
  out = {}
  for k, v in data.items():
    key = f"{prefix}{k}"
    if isinstance(v, Mapping) and v:
      out.update(flatten(v, key + "."))
    else:
      out[key] = v
  return out


def _ignored(key: str) -> bool:
  return any(key == f or key.startswith(f + ".") for f in IGNORED_FIELDS)


def trained_part(config: Mapping[str, Any]) -> dict[str, Any]:
  """The flattened config without :data:`IGNORED_FIELDS`."""
  return {k: v for k, v in flatten(config).items() if not _ignored(k)}


def config_fingerprint(config: Mapping[str, Any]) -> str:
  """:func:`fingerprint` of :func:`trained_part`: equal for configs that train the same."""
  return fingerprint(trained_part(config))


def config_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
  """Dotted ``field: old -> new`` lines for every field that changes what is trained.

  A field present on one side only shows ``<absent>`` on the other; values are
  shown as JSON. :data:`IGNORED_FIELDS` are left out.
  """
  a, b = trained_part(old), trained_part(new)
  show = lambda d, k: canonical_json(d[k]) if k in d else "<absent>"
  return [f"{k}: {show(a, k)} -> {show(b, k)}" for k in sorted(set(a) | set(b))
          if k not in a or k not in b or canonical_json(a[k]) != canonical_json(b[k])]


# Cohort fingerprints of the two trainers.


def prepared_cohort_fingerprint(prepared, cohort: str) -> str:
  """Fingerprint of a ``jaxsurv.data.prepare.PreparedCohort`` (the MMNN trainer's cohort).

  Covers the configured cohort name or manifest path, the prepared dataset's
  name (for a manifest it carries a hash of the manifest's content; for a demo
  cohort its seed and size), the preprocessing fingerprint, the patient ids
  and every outcome column (``*_time``, ``*_event``). Not the images (the
  dataset name and preprocessing fingerprint stand for them) nor where the
  cache lives.

  Raises:
    ValueError: an outcome column holds non-numeric values.
  """
  table = prepared.table
  outcomes = sorted(c for c in table.columns
                    if str(c).endswith("_time") or str(c).endswith("_event"))
  return fingerprint({
      "cohort": str(cohort), "dataset": pathlib.Path(prepared.dataset_dir).name,
      "preprocess": prepared.fingerprint,
      "patient_ids": [str(p) for p in prepared.patient_ids],
      "outcomes": {str(c): [None if v != v else float(v) for v in table[c].astype(float)]
                   for c in outcomes}})


def multimodal_cohort_fingerprint(cohort) -> str:
  """Fingerprint of a ``jaxsurv.data.multimodal.MultimodalCohort`` (the fusion trainer's).

  sha256 over the patient ids, the modality names with their feature counts
  (bag width and tile count), the presence masks and the outcome arrays
  (duration, event): cheap, and changed by any change of patients, modalities
  or outcomes.
  """
  import numpy as np  # pylint: disable=import-outside-toplevel
  h = hashlib.sha256()
  h.update(canonical_json({
      "patient_ids": [str(p) for p in cohort.patient_ids],
      "tabular": {m: list(np.shape(x)[1:]) for m, x in cohort.tabular.items()},
      "bags": {m: list(np.shape(b[0])[1:]) for m, b in cohort.bags.items()},
  }).encode())
  for m in sorted(cohort.presence):
    h.update(m.encode() + np.ascontiguousarray(cohort.presence[m], bool).tobytes())
  h.update(np.ascontiguousarray(cohort.duration, np.float64).tobytes())
  h.update(np.ascontiguousarray(cohort.event, np.int64).tobytes())
  return h.hexdigest()


# ----------------------------------------------------------------------------
# Files.
# ----------------------------------------------------------------------------


def _now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _version() -> str:
  import jaxsurv  # pylint: disable=import-outside-toplevel
  return getattr(jaxsurv, "__version__", "unknown")


def write_json_atomic(data: Any, path: pathlib.Path) -> None:
  """Writes ``data`` as indented JSON to ``path`` via a temporary file and ``os.replace``.

  Raises:
    OSError: the folder is not writable, the disk is full, ...; TypeError:
      ``data`` is not JSON data. ``path`` is unchanged then.
  """
  if not distributed.is_primary():  # Process 0 writes in a multi-process run.
    return
  fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
  try:
    with os.fdopen(fd, "w") as f:
      json.dump(data, f, indent=2, sort_keys=True)
      f.write("\n")
      f.flush()
      os.fsync(f.fileno())
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


def _read_json(path: pathlib.Path) -> Any:
  try:
    return json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise UserError(f"{path}: not valid JSON ({e}); the run record is damaged: move it away "
                    "or use a new --workdir") from None


# Files next to config.json that mark a run written before run.json existed.
_OLDER_RUN_FILES = ("results.json", "splits.json", "preprocess.json")


def is_run_dir(path: PathLike) -> bool:
  """True for a run folder: it has ``run.json``, or (as older runs have) ``checkpoints/``,
  or ``config.json`` together with ``results.json``, ``splits.json`` or ``preprocess.json``."""
  p = pathlib.Path(path)
  try:
    return ((p / RUN_RECORD).is_file() or (p / "checkpoints").is_dir()
            or ((p / CONFIG_FILE).is_file() and any((p / f).is_file() for f in _OLDER_RUN_FILES)))
  except OSError:
    return False


# ----------------------------------------------------------------------------
# Opening a run.
# ----------------------------------------------------------------------------


def _check_writable(workdir: pathlib.Path) -> None:
  """UserError unless ``workdir`` is (or can be created as) a writable folder."""
  if workdir.exists():
    if not workdir.is_dir():
      raise UserError(f"--workdir {workdir}: exists and is not a folder")
    if not os.access(workdir, os.W_OK | os.X_OK):
      raise UserError(f"--workdir {workdir}: folder is not writable")
    return
  parent = workdir.parent
  while not parent.exists() and parent != parent.parent:
    parent = parent.parent
  if not parent.is_dir():
    raise UserError(f"--workdir {workdir}: cannot be created, {parent} is not a folder")
  if not os.access(parent, os.W_OK | os.X_OK):
    raise UserError(f"--workdir {workdir}: cannot be created, {parent} is not writable")


def _how_to_proceed() -> str:
  return ("Nothing was written. To keep that run as it is, train into a new --workdir; to "
          "continue it with the new config, pass --allow_changed_config (in Python: "
          "allow_changed_config=True): config.json then describes the new config, and run.json's "
          "history the one it replaces.")


def _record(config: dict, cohort_fp: str, created: str | None = None,
            history: list | None = None, now: str | None = None) -> dict:
  now = now or _now()
  return {"format": FORMAT, "jaxsurv_version": _version(), "created": created or now,
          "config_since": now, "config_fingerprint": config_fingerprint(config),
          "cohort_fingerprint": cohort_fp, "config": config, "history": list(history or [])}


def _next_config_file(workdir: pathlib.Path) -> str:
  k = 1
  while (workdir / f"config.{k}.json").exists():
    k += 1
  return f"config.{k}.json"


def open_run(workdir: PathLike, config: dict, cohort_fingerprint: str, *,
             allow_changed: bool = False) -> pathlib.Path:
  """Creates a run folder, or accepts it again, or refuses it before any work.

  In a multi-process run every process checks the folder, process 0 alone
  writes, and no process goes on before process 0 has (a barrier).

  Call after the cohort and config have been validated and before anything
  is written to ``workdir``.

  * A new run (``workdir`` absent or an empty folder): the folder is created,
    ``run.json`` (see the module docstring) and ``config.json`` are written
    atomically (temporary file, ``os.replace``).
  * The same run (``run.json``'s config and cohort fingerprint equal the new
    ones, :data:`IGNORED_FIELDS` aside): nothing is refused and the trainer
    resumes; if only ignored fields differ, ``config.json`` and ``run.json``
    take the new values (no history entry).
  * Another config or cohort: ``UserError`` listing each differing field as
    ``data.fold: 0 -> 1`` (and ``cohort changed: <old> -> <new>``) and how to
    proceed; nothing is written. With ``allow_changed=True`` the run goes on:
    the previous config is kept as ``config.<k>.json`` (k = 1, 2, ...), the
    new one is written as ``config.json``, and ``run.json`` records the new
    config and appends the previous one to ``history``.
  * A folder written before ``run.json`` existed (``config.json`` with
    ``checkpoints/``, ``results.json``, ``splits.json`` or
    ``preprocess.json``) is compared with its ``config.json`` (its cohort is
    unknown and is taken as the given one) and gets a ``run.json``.
  * A folder that is not empty and holds no jaxsurv run is refused: the run's
    files would mix with files of unknown origin (use an empty or new folder).

  Args:
    workdir: the run folder.
    config: the resolved config as JSON-safe data (:func:`config_to_dict`).
    cohort_fingerprint: the cohort's fingerprint
      (:func:`prepared_cohort_fingerprint`, :func:`multimodal_cohort_fingerprint`).
    allow_changed: continue a run whose config or cohort changed.

  Returns:
    ``workdir`` as a ``pathlib.Path`` (existing, with ``run.json`` and
    ``config.json``).

  Raises:
    UserError: ``workdir`` exists and is not a folder, is not writable (or
      cannot be created: its nearest existing parent is not a writable
      folder), holds files but no jaxsurv run, holds a run whose config or
      cohort differs (unless ``allow_changed``), holds a damaged ``run.json``,
      or an older run without ``config.json``.
    OSError: writing the files failed (e.g. disk full).
  """
  out = _open_run(workdir, config, cohort_fingerprint, allow_changed=allow_changed)
  distributed.barrier("jaxsurv.runs.open_run")
  return out


def _open_run(workdir: PathLike, config: dict, cohort_fingerprint: str, *,
              allow_changed: bool) -> pathlib.Path:
  workdir = pathlib.Path(workdir)
  config = json.loads(canonical_json(config))  # Plain JSON data, as it will be read back.
  _check_writable(workdir)
  record_path, config_path = workdir / RUN_RECORD, workdir / CONFIG_FILE
  entries = sorted(p.name for p in workdir.iterdir()) if workdir.is_dir() else []

  if not entries:
    workdir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(_record(config, cohort_fingerprint), record_path)
    write_json_atomic(config, config_path)
    return workdir

  if record_path.exists():
    record = _read_json(record_path)
    if not isinstance(record, dict) or not isinstance(record.get("config"), dict):
      raise UserError(f"{record_path}: not a jaxsurv run record (no 'config'); move it away or "
                      "use a new --workdir")
    old_config, old_cohort = record["config"], record.get("cohort_fingerprint")
  else:
    legacy = ({"checkpoints", *_OLDER_RUN_FILES} & set(entries)) if is_run_dir(workdir) else ()
    if not legacy:
      shown = ", ".join(entries[:5]) + (f", ... ({len(entries)} entries)" if len(entries) > 5
                                        else "")
      raise UserError(f"--workdir {workdir}: folder is not empty ({shown}) and holds no jaxsurv "
                      f"run ({RUN_RECORD}); a run is never mixed with other files: use an empty "
                      "or new --workdir")
    if not config_path.is_file():
      raise UserError(f"--workdir {workdir}: holds an earlier run ({', '.join(sorted(legacy))}) "
                      f"without {CONFIG_FILE}, so what trained it is unknown; use a new --workdir")
    old_config = _read_json(config_path)
    if not isinstance(old_config, dict):
      raise UserError(f"{config_path}: not a config (a JSON object expected)")
    old_cohort = None  # Unknown: runs before run.json did not record it.
    record = _record(old_config, cohort_fingerprint)
    record["created"] = record["config_since"] = None

  changes = config_changes(old_config, config)
  cohort_changed = old_cohort is not None and old_cohort != cohort_fingerprint
  if cohort_changed:
    changes.append(f"cohort changed: {old_cohort[:_SHORT]} -> {cohort_fingerprint[:_SHORT]}")

  if not changes:
    if old_config != config or not record_path.exists() or not config_path.is_file():
      # Same training; record the current values of the ignored fields (and
      # restore config.json or adopt an older run).
      new = dict(record, config=config, config_fingerprint=config_fingerprint(config),
                 cohort_fingerprint=cohort_fingerprint, jaxsurv_version=_version())
      new["created"] = new.get("created") or _now()
      new["config_since"] = new.get("config_since") or new["created"]
      write_json_atomic(new, record_path)
      write_json_atomic(config, config_path)
    return workdir

  if not allow_changed:
    raise UserError(f"--workdir {workdir} holds a run trained with another config or cohort:"
                    "\n  " + "\n  ".join(changes) + "\n" + _how_to_proceed())

  kept = _next_config_file(workdir)
  now = _now()
  write_json_atomic(old_config, workdir / kept)
  history = list(record.get("history") or [])
  history.append({"config_file": kept, "config_fingerprint": config_fingerprint(old_config),
                  "cohort_fingerprint": old_cohort, "since": record.get("config_since"),
                  "until": now, "changes": changes})
  new = _record(config, cohort_fingerprint, created=record.get("created"), history=history,
                now=now)
  write_json_atomic(new, record_path)
  write_json_atomic(config, config_path)
  return workdir


# ----------------------------------------------------------------------------
# Outputs near runs.
# ----------------------------------------------------------------------------


def _runs_below(folder: pathlib.Path) -> Iterable[pathlib.Path]:
  """Run folders strictly below ``folder`` (symbolic links not followed)."""
  for root, dirs, _ in os.walk(folder, onerror=lambda e: None, followlinks=False):
    keep = []
    for d in dirs:
      p = pathlib.Path(root) / d
      if is_run_dir(p):
        yield p
      else:
        keep.append(d)
    dirs[:] = keep


def refuse_output_near_runs(out_dir: PathLike, flag: str = "--out") -> None:
  """Refuses an output folder that is, lies inside or contains a run folder.

  A command that writes ``out_dir`` (and with ``--overwrite`` replaces it)
  must never write into a run or delete one. Run folders are recognised by
  :func:`is_run_dir`. Symbolic links are resolved for ``out_dir`` and its
  parents, not followed below it.

  Args:
    out_dir: the output folder (need not exist).
    flag: the option named in the message.

  Raises:
    UserError: ``out_dir`` is a run folder, lies inside one, or contains one
      at any depth; the message names the run folder.
  """
  out = pathlib.Path(os.path.abspath(os.path.expanduser(os.fspath(out_dir))))
  resolved = out.resolve()
  for p in dict.fromkeys([out, *out.parents, resolved, *resolved.parents]):
    if is_run_dir(p):
      if p in (out, resolved):
        raise UserError(f"{flag} {out_dir}: is the run folder {p}; writing there would mix with "
                        "(or, with --overwrite, delete) the run: choose a folder outside it")
      raise UserError(f"{flag} {out_dir}: lies inside the run folder {p}; choose a folder "
                      "outside any run")
  if resolved.is_dir():
    for run in _runs_below(resolved):
      raise UserError(f"{flag} {out_dir}: contains the run folder {run} (--overwrite would "
                      "delete it); choose a folder that holds no run")
