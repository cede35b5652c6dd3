r"""Multi-process (multi-host) runs on JAX's own distributed runtime.

One command trains on 1 or N processes: every command line initialises
``jax.distributed`` here (:func:`initialize`, called by ``jaxsurv.cli``
before any JAX computation) when its flags or the environment ask for it,
and the shared trainer (``jaxsurv.trainer``) then runs unchanged on a
``("data",)`` mesh over the devices of all processes:

* each process puts only its rows of every global batch on its devices
  (:func:`global_batch`, ``jax.make_array_from_process_local_data``), so the
  jitted step sees one global batch: the Cox risk set and the
  gradient-blending losses are those of the whole global batch, never one
  process's slice;
* evaluation runs the same fixed-size, masked batches on every process and
  gathers the outputs (:func:`to_host`), so metrics are over the whole part;
* only process 0 writes files (:func:`is_primary`; ``jaxsurv.io`` and
  ``jaxsurv.runs`` skip their writes elsewhere); Orbax checkpoints are
  written by all processes together (Orbax's multi-process protocol) into
  the shared ``--workdir``.

When to initialise (``--distributed``):

* ``auto`` (default): when ``--coordinator_address`` is given, or when the
  environment names more than one process -- Slurm (``SLURM_NTASKS`` > 1,
  under ``srun``), Open MPI (``OMPI_COMM_WORLD_SIZE`` > 1) or the variables
  of this module's explicit launch (``JAXSURV_COORDINATOR``,
  ``JAXSURV_NUM_PROCESSES``, ``JAXSURV_PROCESS_ID``; e.g. a Kubernetes
  indexed Job, process id ``JOB_COMPLETION_INDEX``). JAX's own cluster
  detection then fills in what the flags leave out;
* ``on``: always (JAX detects the cluster, or the flags name it);
* ``off``: never (one process, the default on a workstation).

A peer that never connects ends every process within
``--distributed_timeout`` seconds (JAX aborts the process, exit status 134,
after its ``initialization_timeout``); a peer lost during training ends the
others after ``--heartbeat_timeout`` seconds. Before connecting, each
process prints one line naming itself, the process count and the
coordinator, so the log says which peer was waited for.

References: JAX "Multi-host and multi-process environments"
(``jax.distributed.initialize``, ``jax.make_array_from_process_local_data``);
big_vision's per-host input pipeline (process-local batches of
``global_batch // process_count``).
"""

from __future__ import annotations

import os
import sys
import threading
from typing import Any, Mapping

import numpy as np
from absl import flags

from jaxsurv.errors import UserError

MODES = ("auto", "on", "off")
ENV_COORDINATOR = "JAXSURV_COORDINATOR"
ENV_NUM_PROCESSES = "JAXSURV_NUM_PROCESSES"
ENV_PROCESS_ID = "JAXSURV_PROCESS_ID"

def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """Defines the ``--distributed`` flags on ``flag_values`` (once)."""
  if "distributed" in flag_values:
    return
  f = dict(flag_values=flag_values)
  flags.DEFINE_enum("distributed", "auto", MODES,
                    "Multi-process run on jax.distributed: auto (when --coordinator_address "
                    "or Slurm/Open MPI/JAXSURV_* variables name several processes), on, off", **f)
  flags.DEFINE_string("coordinator_address", None,
                      f"host:port of process 0 (or ${ENV_COORDINATOR})", **f)
  flags.DEFINE_integer("num_processes", None,
                       f"number of processes (or ${ENV_NUM_PROCESSES})", lower_bound=1, **f)
  flags.DEFINE_integer("process_id", None,
                       f"this process's index, 0-based (or ${ENV_PROCESS_ID}, or "
                       "$JOB_COMPLETION_INDEX)", lower_bound=0, **f)
  flags.DEFINE_integer("distributed_timeout", 300,
                       "seconds to wait for every process to connect", lower_bound=1, **f)
  flags.DEFINE_integer("heartbeat_timeout", 100,
                       "seconds without a heartbeat after which a peer counts as lost",
                       lower_bound=1, **f)
  flags.DEFINE_list("local_device_ids", None,
                    "this process's devices, e.g. 0,1,2,3,4,5,6,7 for one process per 8-GPU "
                    "host (default: JAX's choice; under Slurm one device per task, "
                    "$SLURM_LOCALID)", **f)


def _env_int(env: Mapping[str, str], *names: str) -> int | None:
  for name in names:
    value = env.get(name)
    if value not in (None, ""):
      try:
        return int(value)
      except ValueError:
        raise UserError(f"${name}={value!r} is not an integer") from None
  return None


def settings(mode: str = "auto", coordinator_address: str | None = None,
             num_processes: int | None = None, process_id: int | None = None,
             env: Mapping[str, str] | None = None) -> dict | None:
  """What :func:`initialize` would pass to ``jax.distributed.initialize``.

  Args:
    mode: ``"auto"``, ``"on"`` or ``"off"`` (module docstring).
    coordinator_address, num_processes, process_id: the flags (None: from
      ``env``, or left to JAX's cluster detection).
    env: the environment (default ``os.environ``).

  Returns:
    None for a one-process run, else ``{"coordinator_address",
    "num_processes", "process_id"}`` (None values are detected by JAX).

  Raises:
    UserError: an unknown mode, a process id outside ``[0, num_processes)``,
      an explicit launch without the coordinator, or a non-integer variable.
  """
  env = os.environ if env is None else env
  if mode not in MODES:
    raise UserError(f"--distributed must be one of {MODES}, got {mode!r}")
  if mode == "off":
    return None
  address = coordinator_address or env.get(ENV_COORDINATOR) or None
  n = num_processes if num_processes is not None else _env_int(env, ENV_NUM_PROCESSES)
  pid = process_id if process_id is not None else _env_int(env, ENV_PROCESS_ID,
                                                           "JOB_COMPLETION_INDEX")
  scheduler = max(_env_int(env, "SLURM_NTASKS") or 1, _env_int(env, "OMPI_COMM_WORLD_SIZE") or 1)
  several = address is not None or (n or 1) > 1 or scheduler > 1
  if mode == "auto" and not several:
    return None
  if (n or 1) > 1 and address is None and scheduler <= 1:
    raise UserError(f"--num_processes={n} needs --coordinator_address (or ${ENV_COORDINATOR}) "
                    "when Slurm or Open MPI do not start the processes")
  if n is not None and pid is not None and not 0 <= pid < n:
    raise UserError(f"--process_id={pid} must be in [0, {n}) for --num_processes={n}")
  return {"coordinator_address": address, "num_processes": n, "process_id": pid}


def initialize(mode: str = "auto", coordinator_address: str | None = None,
               num_processes: int | None = None, process_id: int | None = None, *,
               timeout: int = 300, heartbeat_timeout: int = 100,
               local_device_ids=None, env: Mapping[str, str] | None = None) -> bool:
  """Connects this process to the others (``jax.distributed.initialize``) if asked to.

  Must run before any JAX computation (``jaxsurv.cli`` calls it first).

  Args:
    mode, coordinator_address, num_processes, process_id, env: see
      :func:`settings`.
    timeout: seconds to wait for every process (``initialization_timeout``).
    heartbeat_timeout: seconds after which a silent peer counts as lost.
    local_device_ids: this process's devices (e.g. ``[k]``: one GPU per
      process; default all visible, or what the cluster detection sets).

  Returns:
    True when this is now a multi-process run.

  Raises:
    UserError: see :func:`settings`.
  """
  import jax  # pylint: disable=import-outside-toplevel
  s = settings(mode, coordinator_address, num_processes, process_id, env)
  if s is None or jax.distributed.is_initialized():
    return jax.distributed.is_initialized()
  who = ("process " + ("?" if s["process_id"] is None else str(s["process_id"])) + " of "
         + ("?" if s["num_processes"] is None else str(s["num_processes"])))
  print(f"jaxsurv: {who}: connecting to the coordinator at "
        f"{s['coordinator_address'] or '(detected)'}; a process that does not connect within "
        f"{timeout} s ends every process", file=sys.stderr, flush=True)
  kwargs = {k: v for k, v in s.items() if v is not None}
  if local_device_ids is not None:
    kwargs["local_device_ids"] = local_device_ids
  # JAX aborts the process (SIGABRT) when a peer is missing, saying only
  # "Deadline Exceeded": say first which processes were waited for.
  done = threading.Event()
  watchdog = threading.Thread(target=_missing_peer_message, daemon=True,
                              args=(done, max(1.0, timeout - 0.5), who, s))
  watchdog.start()
  try:
    jax.distributed.initialize(initialization_timeout=int(timeout),
                               heartbeat_timeout_seconds=int(heartbeat_timeout), **kwargs)
  finally:
    done.set()
  print(f"jaxsurv: process {jax.process_index()} of {jax.process_count()} connected "
        f"({jax.local_device_count()} local, {jax.device_count()} global devices)",
        file=sys.stderr, flush=True)
  return True


def _missing_peer_message(done: threading.Event, after: float, who: str, s: Mapping) -> None:
  if done.wait(after):
    return
  n, pid = s["num_processes"], s["process_id"]
  if n is not None and pid is not None:
    others = [i for i in range(n) if i != pid]
    peers = f"processes {', '.join(map(str, others))}" if len(others) > 1 else f"process {others[0]}"
  else:
    peers = "the other processes"
  print(f"jaxsurv: error: {who}: not every process connected to the coordinator at "
        f"{s['coordinator_address'] or '(detected)'} within {after + 0.5:.0f} s; waited for "
        f"{peers}{'' if pid == 0 else ' (process 0 runs the coordinator)'}: check that each was "
        "started with the same --coordinator_address and --num_processes and can reach that "
        "address; this process now ends", file=sys.stderr, flush=True)


def initialize_from_flags(flag_values: flags.FlagValues = flags.FLAGS) -> bool:
  """:func:`initialize` with the flags of :func:`define_flags` (if defined)."""
  if "distributed" not in flag_values:
    return False
  fv = flag_values
  ids = fv.local_device_ids
  try:
    ids = None if ids is None else [int(i) for i in ids]
  except ValueError:
    raise UserError(f"--local_device_ids: expected comma-separated integers, got "
                    f"{','.join(ids)}") from None
  return initialize(fv.distributed, fv.coordinator_address, fv.num_processes, fv.process_id,
                    timeout=fv.distributed_timeout, heartbeat_timeout=fv.heartbeat_timeout,
                    local_device_ids=ids)


def process_index() -> int:
  """This process's index: 0 unless ``jax.distributed`` was initialised (by
  :func:`initialize` or by the caller's own code); no JAX backend start-up
  on one process."""
  import jax  # pylint: disable=import-outside-toplevel
  return jax.process_index() if jax.distributed.is_initialized() else 0


def process_count() -> int:
  """Number of processes (1 unless ``jax.distributed`` was initialised)."""
  import jax  # pylint: disable=import-outside-toplevel
  return jax.process_count() if jax.distributed.is_initialized() else 1


def is_primary() -> bool:
  """True on process 0, the one that writes files."""
  return process_index() == 0


def local_rows(size: int) -> slice:
  """This process's rows ``[start, stop)`` of a global batch of ``size`` rows.

  The global batch is split into ``process_count`` equal, contiguous
  blocks in process order, which is the order of the devices of a
  ``("data",)`` mesh over ``jax.devices()``.

  Raises:
    ValueError: ``size`` is not a multiple of the process count.
  """
  n, i = process_count(), process_index()
  if size % n:
    raise ValueError(f"a global batch of {size} rows does not split over {n} processes")
  per = size // n
  return slice(i * per, (i + 1) * per)


def global_batch(tree: Any, sharding, size: int) -> Any:
  """A global ``[size, ...]`` array per leaf from this process's rows.

  Args:
    tree: host arrays, each ``[size // process_count, ...]``: this
      process's rows (:func:`local_rows`) of the global batch.
    sharding: the batch sharding (``NamedSharding(mesh, P("data"))``).
    size: the global batch size.

  Returns:
    The same tree of ``jax.Array`` with global shape ``[size, ...]``.
  """
  import jax  # pylint: disable=import-outside-toplevel
  return jax.tree.map(
      lambda a: jax.make_array_from_process_local_data(
          sharding, np.asarray(a), (size,) + tuple(np.shape(a)[1:])), tree)


def to_host(tree: Any) -> Any:
  """Host numpy copies of (possibly cross-process) arrays: the whole global value."""
  import jax  # pylint: disable=import-outside-toplevel
  if process_count() == 1:
    return jax.tree.map(np.asarray, tree)
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))


def barrier(name: str) -> None:
  """Waits until every process reaches ``barrier(name)`` (no-op on one process)."""
  if process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    multihost_utils.sync_global_devices(name)


def primary_first(fn, name: str):
  """``fn()`` on process 0, then (after a barrier) on the others.

  For work that fills a cache on first use (preparing a cohort, fetching a
  package's data): process 0 fills it, the others then read it. On one
  process it is just ``fn()``. If process 0 fails, the others end when its
  heartbeat stops (``--heartbeat_timeout``).
  """
  if process_count() == 1:
    return fn()
  if is_primary():
    out = fn()
    barrier(name)
    return out
  barrier(name)
  return fn()


# ----------------------------------------------------------------------------
# Local launcher: N processes of one command on this machine.
# ----------------------------------------------------------------------------


def free_port() -> int:
  """A TCP port on 127.0.0.1 that was free a moment ago."""
  import socket  # pylint: disable=import-outside-toplevel
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def launch_local(command, num_processes: int, *, port: int | None = None,
                 timeout: int = 300, poll_s: float = 0.5) -> int:
  """Runs ``command`` as ``num_processes`` processes of one run on this machine.

  Each process gets ``JAXSURV_COORDINATOR=127.0.0.1:<port>``,
  ``JAXSURV_NUM_PROCESSES`` and ``JAXSURV_PROCESS_ID`` (read by
  :func:`settings`), and on CPU one device each. When a process fails, the
  others are stopped (by PID) and its exit status is returned.

  Args:
    command: the argv of one process, e.g. ``["python", "launch.py", ...]``.
    num_processes: processes to start (>= 1).
    port: the coordinator's port (default: a free one).
    timeout: ``--distributed_timeout`` given to each process.
    poll_s: how often the processes are checked.

  Returns:
    0 when every process succeeded, else the first failing exit status.
  """
  import subprocess  # pylint: disable=import-outside-toplevel
  import time  # pylint: disable=import-outside-toplevel
  if num_processes < 1:
    raise UserError(f"--num_processes must be >= 1, got {num_processes}")
  if not command:
    raise UserError("no command to launch: python -m jaxsurv.distributed --num_processes=2 -- "
                    "python launch.py --config=... --workdir=...")
  port = port or free_port()
  procs = []
  try:
    for pid in range(num_processes):
      env = dict(os.environ, **{ENV_COORDINATOR: f"127.0.0.1:{port}",
                                ENV_NUM_PROCESSES: str(num_processes),
                                ENV_PROCESS_ID: str(pid)})
      env.setdefault("JAX_NUM_CPU_DEVICES", "1")
      procs.append(subprocess.Popen(list(command) + [f"--distributed_timeout={timeout}"],
                                    env=env))
    while True:
      codes = [p.poll() for p in procs]
      failed = [c for c in codes if c not in (None, 0)]
      if failed:
        return failed[0]
      if all(c == 0 for c in codes):
        return 0
      time.sleep(poll_s)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()


def _main(argv) -> int:
  fv = flags.FLAGS
  return launch_local(argv[1:], fv.local_processes, timeout=fv.distributed_timeout)


if __name__ == "__main__":
  from jaxsurv import cli  # pylint: disable=import-outside-toplevel
  flags.DEFINE_integer("local_processes", 2, "processes to start on this machine",
                       lower_bound=1)
  cli.run(_main)
