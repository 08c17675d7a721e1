"""Crash-consistent outputs: a batch run writes into a staging directory and publishes it in one step at the end.

Batch runs on local outputs (direct and dask runners):

    <parent>/.<name>.cloakbeam-staging-<run id>/   everything the run writes: data/ (any sub-directories, such as
                                                   split partitions), quarantine/, reports, manifest.json + .sig
    publish: rename(staging -> OUT) when OUT does not exist, else an atomic exchange of the two directories
             (Linux renameat2 RENAME_EXCHANGE) followed by removing the old tree. Readers see the previous
             complete output or the new complete output, never a mix.

The staging directory is a sibling of OUT so that the final rename stays on one filesystem. When OUT is itself a
mount point it cannot be renamed (and when its parent is not writable no sibling can be made); staging then lives inside OUT (`OUT/.cloakbeam-staging-<run id>/`) and publishing
moves the entries one by one, manifest last (documented as not atomic). Where RENAME_EXCHANGE is unavailable the
old tree is first renamed aside (`.<name>.cloakbeam-old-<run id>`): a crash between the two renames leaves no OUT,
and the next run puts the old tree back before anything else.

A failed run (any exception) removes its staging directory and writes `OUT/.cloakbeam-failure.json`: run id, time,
the error's class and its one-sentence message (cloakbeam messages never hold a value; other exceptions are
recorded by class only). A previous complete output is left untouched otherwise. A killed run leaves its staging
directory behind; the next run into the same OUT removes it (unless its owner process is still alive) and writes
the failure record for it. A rerun therefore replaces, and never adds to, what an earlier run wrote.

Object stores (gs://, s3://) have no atomic rename: runs write in place and the manifest, written last, is the
commit record naming exactly the committed files (docs/architecture.md, "Crash consistency").
Nothing here reads or logs a record value.
"""

from __future__ import annotations

import ctypes
import datetime as dt
import errno
import json
import os
import shutil
import socket
import sys
from dataclasses import dataclass
from typing import Any

from cloakbeam.core import fsio
from cloakbeam.errors import CloakbeamError, ConfigError

FAILURE_NAME = ".cloakbeam-failure.json"
OWNER_NAME = ".cloakbeam-owner.json"
STAGING_TAG = ".cloakbeam-staging-"
OLD_TAG = ".cloakbeam-old-"
#: Entries that mark a directory as holding a cloakbeam run (complete or not).
RUN_MARKERS = ("manifest.json", "data", "quarantine", "manifests", ".cloakbeam-run", FAILURE_NAME)
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


@dataclass(frozen=True)
class OutputPlan:
    """Where a run writes (`staging`) and where it publishes (`final`); both the same for in-place outputs."""

    final: str
    staging: str
    run_id: str
    mode: str  # "swap" (sibling staging, atomic), "inside" (OUT is a mount point), "in-place" (object store, streaming)

    @property
    def staged(self) -> bool:
        return self.mode != "in-place"


def _sibling(final: str, tag: str, run_id: str) -> str:
    parent, name = os.path.split(os.path.normpath(final))
    return os.path.join(parent, f".{name}{tag}{run_id}")


def _is_run(final: str) -> list[str]:
    return [n for n in RUN_MARKERS if os.path.lexists(os.path.join(final, n))]


def plan_output(final: str, run_id: str, overwrite: bool, in_place: bool = False) -> OutputPlan:
    """Check the output location, clean up after earlier killed runs and create the staging directory.

    Refuses (ConfigError) an output that holds a complete run without `overwrite`, and one that holds files that
    are not a cloakbeam run (publishing replaces the directory as a whole)."""
    if not fsio.is_local(final):
        return OutputPlan(final, final, run_id, "in-place")
    final = os.path.abspath(final)
    if os.path.lexists(final) and not os.path.isdir(final):
        raise ConfigError(f"output {final} exists and is not a directory")
    recover_abandoned(final)
    if in_place:
        os.makedirs(final, exist_ok=True)
        return OutputPlan(final, final, run_id, "in-place")
    if os.path.isdir(final):
        entries = [n for n in os.listdir(final) if not n.startswith(STAGING_TAG)]
        markers = _is_run(final)
        complete = os.path.exists(os.path.join(final, "manifest.json"))
        if complete and not overwrite:
            raise ConfigError(f"output directory {final} already holds a run (manifest.json); choose another --output or pass --overwrite")
        strangers = sorted(n for n in entries if n not in RUN_MARKERS and not n.startswith("manifest.json") and n != "report.html")
        if strangers and not markers:
            raise ConfigError(
                f"output directory {final} is not empty and holds no cloakbeam run (first entry: {strangers[0]}); "
                "a run replaces its output directory as a whole, so choose a new or empty directory"
            )
    parent = os.path.dirname(os.path.normpath(final))
    # A mount point cannot be renamed, and a sibling needs a writable parent: then stage inside OUT (not atomic).
    mode = "inside" if os.path.isdir(final) and (os.path.ismount(final) or not os.access(parent, os.W_OK)) else "swap"
    staging = os.path.join(final, f"{STAGING_TAG}{run_id}") if mode == "inside" else _sibling(final, STAGING_TAG, run_id)
    os.makedirs(staging, mode=0o700)
    with open(os.path.join(staging, OWNER_NAME), "w", encoding="utf-8") as fh:
        json.dump({"run_id": run_id, "pid": os.getpid(), "host": socket.gethostname(), "started_at": _now()}, fh)
    return OutputPlan(final, staging, run_id, mode)


def publish(plan: OutputPlan) -> None:
    """Make the staged output the output, in one rename where the filesystem allows it."""
    if not plan.staged:
        return
    os.unlink(os.path.join(plan.staging, OWNER_NAME))
    if plan.mode == "inside":
        _publish_inside(plan)
        return
    if not os.path.lexists(plan.final):
        os.rename(plan.staging, plan.final)
        return
    if _exchange(plan.staging, plan.final):
        shutil.rmtree(plan.staging, ignore_errors=True)  # now the previous output
        return
    old = _sibling(plan.final, OLD_TAG, plan.run_id)
    os.rename(plan.final, old)
    os.rename(plan.staging, plan.final)
    shutil.rmtree(old, ignore_errors=True)


def _publish_inside(plan: OutputPlan) -> None:
    new = sorted(n for n in os.listdir(plan.staging))
    for n in os.listdir(plan.final):
        if n in RUN_MARKERS or n.startswith("manifest.json") or n == "report.html" or n in new:
            p = os.path.join(plan.final, n)
            shutil.rmtree(p) if os.path.isdir(p) and not os.path.islink(p) else os.unlink(p)
    for n in sorted(new, key=lambda n: n.startswith("manifest.json")):  # the manifest last
        os.rename(os.path.join(plan.staging, n), os.path.join(plan.final, n))
    os.rmdir(plan.staging)


def _exchange(a: str, b: str) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), b)


def fail(plan: OutputPlan, exc: BaseException) -> None:
    """Discard the staging directory and record why the run failed, beside the output it did not replace."""
    if plan.staged:
        _remove_settled(plan.staging)
    if not fsio.is_local(plan.final):
        try:
            with fsio.atomic_writer(fsio.join(plan.final, FAILURE_NAME)) as w:
                w.write(json.dumps(failure_record(plan.run_id, exc), indent=2).encode())
        except Exception:  # the store may be what failed; the error itself still reaches the caller
            pass
        return
    write_failure(plan.final, failure_record(plan.run_id, exc))


def _remove_settled(path: str, quiet_seconds: float = 1.0, limit_seconds: float = 15.0) -> None:
    """Remove a staging directory and keep removing it until it stays gone for `quiet_seconds`: when a worker
    process dies, its siblings may still be finishing a bundle and recreate files there for a moment."""
    import time

    deadline = time.monotonic() + limit_seconds
    gone_since: float | None = None
    while time.monotonic() < deadline:
        if os.path.lexists(path):
            shutil.rmtree(path, ignore_errors=True)
            gone_since = None
        elif gone_since is None:
            gone_since = time.monotonic()
        elif time.monotonic() - gone_since >= quiet_seconds:
            return
        time.sleep(0.1)


def failure_record(run_id: str, exc: BaseException | None, reason: str | None = None) -> dict[str, Any]:
    """What the failure record says: the run, when, and the error's class and sentence (cloakbeam errors only:
    their messages name fields, files and lines, never values; any other exception is named by class)."""
    if reason is None and exc is not None:
        reason = str(exc) if isinstance(exc, CloakbeamError) else f"{type(exc).__name__} (details with --verbose)"
    return {"format": "cloakbeam-failure/1", "run_id": run_id, "failed_at": _now(), "error": type(exc).__name__ if exc is not None else "Abandoned", "reason": reason}


def write_failure(final: str, record: dict[str, Any]) -> None:
    try:
        os.makedirs(final, exist_ok=True)
        with fsio.atomic_writer(os.path.join(final, FAILURE_NAME)) as w:
            w.write(json.dumps(record, indent=2, sort_keys=True).encode() + b"\n")
    except OSError:  # a full or read-only disk: the exception still reaches the user as a sentence
        pass


def recover_abandoned(final: str) -> list[str]:
    """Remove staging directories of earlier runs into `final` that were killed; put back an old tree whose
    replacement never arrived. Returns the run ids cleaned up. Refuses while another live run owns one."""
    parent, name = os.path.split(os.path.normpath(final))
    candidates = []
    if os.path.isdir(parent):
        candidates += [(os.path.join(parent, n), n[len(f".{name}{STAGING_TAG}") :]) for n in os.listdir(parent) if n.startswith(f".{name}{STAGING_TAG}")]
        for n in os.listdir(parent):
            if n.startswith(f".{name}{OLD_TAG}"):
                old = os.path.join(parent, n)
                if not os.path.lexists(final):
                    os.rename(old, final)  # the new tree never arrived: the previous output comes back
                else:
                    shutil.rmtree(old, ignore_errors=True)
    if os.path.isdir(final):
        candidates += [(os.path.join(final, n), n[len(STAGING_TAG) :]) for n in os.listdir(final) if n.startswith(STAGING_TAG)]
    cleaned = []
    for path, run_id in candidates:
        owner = _read_json(os.path.join(path, OWNER_NAME))
        if owner and owner.get("host") == socket.gethostname() and _alive(int(owner.get("pid", 0))):
            raise ConfigError(f"another run ({owner.get('run_id')}, process {owner.get('pid')}) is writing to {final}; wait for it or choose another --output")
        shutil.rmtree(path, ignore_errors=True)
        cleaned.append(run_id)
        recorded = _read_json(os.path.join(final, FAILURE_NAME)) or {}
        if recorded.get("run_id") != run_id:  # a run that failed and said why keeps its own record
            write_failure(final, failure_record(run_id, None, "the run did not finish (killed or crashed); its staged output was discarded"))
    return cleaned


def _alive(pid: int) -> bool:
    if pid <= 0 or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_json(path: str) -> dict[str, Any] | None:
    try:
        with open(path, encoding="utf-8") as fh:
            doc = json.load(fh)
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
