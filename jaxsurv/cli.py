"""How every jaxsurv command ends.

Every command line (``launch.py``, ``python -m jaxsurv.predict``,
``python -m jaxsurv.cv``, ``python -m jaxsurv.data``) runs its ``main``
through :func:`run` (``absl.app.run``; in-process: :func:`call`), so they all
end the same way:

* a :class:`jaxsurv.errors.UserError` (bad input: a manifest, a config, a
  workdir), a :class:`jaxsurv.errors.TrainingError`, or an ``OSError`` caused
  by the environment (disk full ``ENOSPC``, quota ``EDQUOT``, permission
  ``EACCES``/``EPERM``, read-only file system ``EROFS``, a missing file
  ``ENOENT``/``FileNotFoundError``, ``IsADirectoryError``,
  ``NotADirectoryError``) prints one message on stderr,
  ``jaxsurv: error: <message>``, and exits non-zero without a traceback. A
  library (Orbax, TFDS) may wrap such an ``OSError`` in its own exception:
  when the root of the ``__cause__``/``__context__`` chain is one of these,
  the message is the root's, followed by where it surfaced;
* ``--debug`` keeps the traceback of those too;
* any other exception is a bug in jaxsurv and keeps its traceback (Python's
  exit status 1).

Exit status: 0 on success, :data:`EXIT_USER_ERROR` (2) for a user or
environment error, :data:`EXIT_TRAINING_ERROR` (3) for a ``TrainingError``,
1 for a bug or an absl flag-parsing error.
"""

from __future__ import annotations

import errno
import functools
import pathlib
import sys
from typing import Any, Callable, NoReturn, Sequence

from absl import app, flags
from absl import logging as absl_logging

from jaxsurv import distributed, malloc
from jaxsurv.errors import TrainingError, UserError

EXIT_USER_ERROR = 2
EXIT_TRAINING_ERROR = 3
PROG = "jaxsurv"

# errno values of an OSError caused by the machine or the user's files, not by jaxsurv.
ENVIRONMENT_ERRNOS = frozenset(
    getattr(errno, name) for name in ("ENOSPC", "EDQUOT", "EACCES", "EPERM", "EROFS", "ENOENT",
                                      "EISDIR", "ENOTDIR") if hasattr(errno, name))
ENVIRONMENT_OSERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)

DefineFlags = Callable[[flags.FlagValues, Sequence[str]], None]


def define_debug_flag(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """Defines ``--debug`` on ``flag_values`` (once)."""
  if "debug" not in flag_values:
    flags.DEFINE_boolean("debug", False, "Show the traceback of user, environment and training "
                         "errors too (they end with one message otherwise).",
                         flag_values=flag_values)


def define_compilation_cache_flag(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """Defines ``--compilation_cache`` on ``flag_values`` (once)."""
  if "compilation_cache" not in flag_values:
    flags.DEFINE_boolean(
        "compilation_cache", True, "Keep compiled train steps and forward passes in JAX's "
        "persistent compilation cache under $JAXSURV_CACHE/jax_compilation_cache, so the next "
        "run on this machine skips compiling them (--nocompilation_cache: off)",
        flag_values=flag_values)


def define_cpu_dispatch_flag(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """Defines ``--cpu_async_dispatch`` on ``flag_values`` (once)."""
  if "cpu_async_dispatch" not in flag_values:
    flags.DEFINE_boolean(
        "cpu_async_dispatch", False, "On the CPU backend, run each compiled program on a JAX "
        "worker thread while Python goes on (JAX's default). Off (jaxsurv's default): the "
        "calling thread runs it, which made the DenseNet-121 train step about 20% faster on "
        "2 cores (benchmarks/RESULTS.md, 'Train step'). No effect on GPU or TPU",
        flag_values=flag_values)


def setup_cpu_dispatch(asynchronous: bool) -> None:
  """Sets JAX's ``jax_cpu_enable_async_dispatch`` for this process.

  Off, XLA:CPU runs a program in the thread that calls it and returns when it
  is done; on (JAX's default), a JAX worker thread runs it. Inline in a
  jaxsurv command, a program's per-execution temporary buffer comes from the
  main thread's heap, which ``jaxsurv.malloc``'s settings keep for the next
  step; a worker thread's arena maps and unmaps it every time
  (``jaxsurv.malloc`` gives the measurements). Only single-device CPU
  programs are affected: GPU and TPU dispatch are not.

  JAX reads the setting when it creates its CPU client, so this must run
  before the first JAX computation; :func:`run` calls it before the
  command's ``main``. Importing jaxsurv never changes it.

  Args:
    asynchronous: True for JAX's worker-thread dispatch, False for inline.
  """
  import jax  # pylint: disable=import-outside-toplevel
  jax.config.update("jax_cpu_enable_async_dispatch", bool(asynchronous))


def setup_compilation_cache(enabled: bool) -> pathlib.Path | None:
  """Turns JAX's persistent compilation cache on (or off) for this process.

  On: ``jax_compilation_cache_dir`` is ``$JAXSURV_CACHE/jax_compilation_cache``
  (default ``~/.cache/jaxsurv``) and programs that took at least 1 s to
  compile are kept (``jax_persistent_cache_min_compile_time_secs``). The
  cache holds compiled native code that later runs load: keep
  ``$JAXSURV_CACHE`` writable only by you, as for the prepared datasets.
  Must run before the first compilation.

  Returns:
    The cache folder, or None when off.
  """
  import jax  # pylint: disable=import-outside-toplevel
  if not enabled:
    jax.config.update("jax_enable_compilation_cache", False)
    return None
  from jaxsurv.data import fetch  # pylint: disable=import-outside-toplevel
  folder = fetch.cache_dir("jax_compilation_cache")
  jax.config.update("jax_compilation_cache_dir", str(folder))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  return folder


def is_environment_error(exc: BaseException) -> bool:
  """True for an ``OSError`` caused by the environment (see the module docstring)."""
  if not isinstance(exc, OSError):
    return False
  return isinstance(exc, ENVIRONMENT_OSERRORS) or exc.errno in ENVIRONMENT_ERRNOS


def _is_clean(exc: BaseException) -> bool:
  return isinstance(exc, (UserError, TrainingError)) or is_environment_error(exc)


def _chain(exc: BaseException) -> list[BaseException]:
  """``exc`` and its causes, outermost first (``__cause__``, else an unsuppressed ``__context__``)."""
  out, seen = [], set()
  while exc is not None and id(exc) not in seen:
    out.append(exc)
    seen.add(id(exc))
    nxt = exc.__cause__
    if nxt is None and not exc.__suppress_context__:
      nxt = exc.__context__
    exc = nxt
  return out


def reportable(exc: BaseException) -> BaseException | None:
  """The exception to report in one message, or None when ``exc`` is a bug.

  ``exc`` itself when it is a user, training or environment error; else the
  root of its cause chain when the root is one (a library wrapped it); else
  None.
  """
  if _is_clean(exc):
    return exc
  root = _chain(exc)[-1]
  return root if root is not exc and _is_clean(root) else None


def _text(exc: BaseException) -> str:
  if isinstance(exc, OSError) and exc.strerror:
    names = [n for n in (exc.filename, exc.filename2) if n is not None]
    return f"{exc.strerror}: {' -> '.join(map(str, names))}" if names else exc.strerror
  return str(exc) or type(exc).__name__


def error_message(exc: BaseException) -> str:
  """The one message printed for ``exc`` (a user, training or environment error).

  Raises:
    ValueError: ``exc`` is a bug (:func:`reportable` is None).
  """
  shown = reportable(exc)
  if shown is None:
    raise ValueError(f"{type(exc).__name__} is not a user, training or environment error")
  text = _text(shown)
  if shown is not exc:
    text += f" (surfaced as {type(exc).__module__}.{type(exc).__name__})"
  return text


def exit_status(exc: BaseException) -> int:
  """:data:`EXIT_TRAINING_ERROR` for a ``TrainingError``, else :data:`EXIT_USER_ERROR`."""
  shown = reportable(exc)
  return EXIT_TRAINING_ERROR if isinstance(shown, TrainingError) else EXIT_USER_ERROR


def config_value(holder: flags.FlagHolder) -> Any:
  """The value of an ``ml_collections`` config-file flag (``--config=file.py[:arg]``).

  ``config_flags`` defers a file that cannot be loaded (missing, unreadable)
  to the first use of the config; this turns that into a clean error.

  Raises:
    UserError: no config was given, or its file could not be loaded.
  """
  value = holder.value
  if value is None:
    raise UserError(f"--{holder.name}: no config file given")
  try:
    hasattr(value, "_jaxsurv_probe")  # A config that failed to load raises OSError on any use.
  except OSError as e:
    raise UserError(f"--{holder.name}: the config file could not be loaded: "
                    f"{e.__cause__ or e}") from e
  return value


def _report(exc: BaseException) -> int:
  print(f"{PROG}: error: {error_message(exc)}", file=sys.stderr, flush=True)
  return exit_status(exc)


def _guarded(main: Callable[..., Any], flag_values: flags.FlagValues | None,
             argv: Sequence[str]) -> Any:
  """Runs ``main``; a reportable error is printed and becomes its exit status (SystemExit)."""
  fv = flags.FLAGS if flag_values is None else flag_values
  try:
    return main(list(argv)) if flag_values is None else main(list(argv), flag_values)
  except Exception as e:  # pylint: disable=broad-except
    if reportable(e) is None or fv["debug"].value:
      raise
    sys.exit(_report(e))


def _quiet_libraries() -> None:
  """absl logging at WARNING unless ``--verbosity`` was given: libraries (Orbax, TFDS) log
  every step at INFO; jaxsurv's own messages use the ``jaxsurv`` logger's level."""
  if "verbosity" in flags.FLAGS and not flags.FLAGS["verbosity"].present:
    absl_logging.set_verbosity(absl_logging.WARNING)


def _run_main(main: Callable[..., Any], flag_values: flags.FlagValues | None,
              argv: Sequence[str]) -> Any:
  _quiet_libraries()
  setup_compilation_cache(flags.FLAGS["compilation_cache"].value)
  setup_cpu_dispatch(flags.FLAGS["cpu_async_dispatch"].value)

  def start(*args):
    # Before JAX's compiler and programs allocate (unless JAXSURV_MALLOC=default).
    malloc.reuse_freed_memory()
    # Before any JAX computation: a multi-process run connects first.
    distributed.initialize_from_flags(flags.FLAGS)
    return main(*args)

  return _guarded(start, flag_values, argv)


def run(main: Callable[..., Any], *, define_flags: DefineFlags | None = None,
        argv: Sequence[str] | None = None) -> NoReturn:
  """``absl.app.run(main)``, ending as described in the module docstring.

  absl logging is set to WARNING before ``main`` runs unless ``--verbosity``
  is given; JAX's persistent compilation cache is on unless
  ``--nocompilation_cache`` (``setup_compilation_cache``); CPU programs run
  in the calling thread unless ``--cpu_async_dispatch``
  (``setup_cpu_dispatch``); a multi-process
  run connects its processes first (``jaxsurv.distributed``: the
  ``--distributed``, ``--coordinator_address``, ``--num_processes``,
  ``--process_id``, ``--distributed_timeout`` and ``--heartbeat_timeout``
  flags of every command); glibc's malloc keeps freed memory for reuse
  unless ``JAXSURV_MALLOC=default`` (``jaxsurv.malloc``).

  Args:
    main: without ``define_flags``, ``main(argv)`` reading flags the caller
      defined on ``absl.flags.FLAGS`` (``launch.py``); with it,
      ``main(argv, flag_values)``. ``argv`` is what absl leaves after the
      flags: the program name, then the positional arguments (e.g. a
      subcommand). Its return value is the exit status (None: 0).
    define_flags: ``define_flags(flag_values, argv)`` defines the command's
      flags on ``flag_values`` (here ``absl.flags.FLAGS``); ``argv`` is the
      command line, for ``ml_collections`` config flags that read their
      ``--config.x=y`` overrides from it.
    argv: the command line (default ``sys.argv``).

  Raises:
    SystemExit: always (absl exits with ``main``'s status, or as documented
      above on an error); a bug's exception propagates with its traceback.
  """
  argv = list(sys.argv if argv is None else argv)
  define_debug_flag(flags.FLAGS)
  define_compilation_cache_flag(flags.FLAGS)
  define_cpu_dispatch_flag(flags.FLAGS)
  distributed.define_flags(flags.FLAGS)
  if define_flags is not None:
    define_flags(flags.FLAGS, argv)
  app.run(functools.partial(_run_main, main, None if define_flags is None else flags.FLAGS),
          argv=argv)
  raise AssertionError("absl.app.run returned")  # app.run always exits.


def call(main: Callable[[list[str], flags.FlagValues], Any], define_flags: DefineFlags,
         args: Sequence[str], *, prog: str = PROG) -> int:
  """Runs a command in-process on fresh flags and returns its exit status.

  The same ending as :func:`run` (one message on stderr for a user, training
  or environment error), for tests and for Python callers; absl's own
  process-wide set-up (logging flags, ``--helpfull``) and the compilation
  cache set-up are not involved (the caller's JAX configuration is kept).

  Args:
    main, define_flags: as in :func:`run`.
    args: the command line without the program name.
    prog: the program name ``main`` sees as ``argv[0]``.

  Returns:
    ``main``'s status (None: 0); :data:`EXIT_USER_ERROR` or
    :data:`EXIT_TRAINING_ERROR` for a reported error; 1 for a flag-parsing
    error or an ``app.UsageError`` (its message on stderr); a ``SystemExit``
    inside ``main`` gives its code.

  Raises:
    Any exception of ``main`` that is a bug (and every reportable one with
    ``--debug``).
  """
  fv = flags.FlagValues()
  argv = [prog] + list(args)
  define_debug_flag(fv)
  define_flags(fv, argv)
  try:
    rest = fv(argv)
  except flags.Error as e:
    print(f"{prog}: flags parsing error: {e}", file=sys.stderr, flush=True)
    return 1
  try:
    status = _guarded(main, fv, rest)
  except app.UsageError as e:
    print(f"{prog}: usage error: {e}", file=sys.stderr, flush=True)
    return e.exitcode
  except SystemExit as e:
    if e.code is None or isinstance(e.code, int):
      return int(e.code or 0)
    print(e.code, file=sys.stderr, flush=True)
    return 1
  return 0 if status is None else int(status)
