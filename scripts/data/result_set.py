"""The files of one run as a set: written into a hidden staging folder beside the output, moved into place
together at the end with a ``<stem>_run.json`` manifest, under a lock, so that a folder never holds a mix of two
runs' files, a stale file of an earlier run, or part of a set after an interrupt.

The standard library has the parts (``os.replace``, ``O_EXCL`` files, ``signal``); nothing in MONAI or ignite
writes a set of files as one unit, hence this module.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import shutil
import signal
import socket
import threading
import uuid
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional

from scripts.utils.file_digest import file_sha256

logger = logging.getLogger(__name__)

MANIFEST_SUFFIX = "run.json"
# every file a run may write for a stem (``<stem>_<suffix>``): an earlier run's file that this run does not
# write again is removed, so the folder never shows maps of one run beside landmarks of another
OUTPUT_SUFFIXES = (
    "misalignment.nii.gz",
    "probabilities.nii.gz",
    "error_mm.nii.gz",
    "landmarks.csv",
    "overlay.png",
    MANIFEST_SUFFIX,
)
DEFERRED_SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP")
LOCK_WRITE_GRACE_S = 10.0  # an unreadable lock younger than this is being written by its run, not stale


class ResultSetError(OSError):
    """The output folder cannot take the run's results (not a folder, not writable, locked by another run); the
    message names ``--output_dir`` and the reason."""


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def describe_file(path: str | os.PathLike) -> Dict[str, Any]:
    """Path, size in bytes and sha256 of a file (what a manifest records of an input or an output)."""
    path = Path(path)
    return {"path": str(path.resolve()), "bytes": path.stat().st_size, "sha256": file_sha256(path)}


def _age_s(path: Path) -> float:
    try:
        return datetime.datetime.now().timestamp() - path.stat().st_mtime
    except OSError:
        return float("inf")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, under another user
    return True


@contextlib.contextmanager
def deferred_signals() -> Iterator[None]:
    """Hold SIGINT/SIGTERM/SIGHUP until the block ends (then deliver the first one), so that a set of renames is
    not cut in half by Ctrl-C; a no-op outside the main thread, where Python cannot install handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: List[int] = []
    previous = {}
    for name in DEFERRED_SIGNALS:
        number = getattr(signal, name, None)
        if number is not None:
            previous[number] = signal.signal(number, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        if received:
            signal.raise_signal(received[0])


class ResultSet:
    """The outputs ``<output_dir>/<stem>_*`` of one run, written as a set.

    ``open()`` checks that ``output_dir`` is (or can be made) a writable folder, takes the lock ``.<stem>.lock`` and
    creates the staging folder; writers put their files under ``staging_dir`` with their final names; ``commit()``
    writes the manifest and moves everything into place with signals held; ``discard()`` removes the staging folder.
    Both release the lock. An earlier run's files of the same stem are replaced as a whole (the ones this run does
    not write are removed).

    Args:
        output_dir: the folder the results go to (created if missing).
        stem: the name every output starts with (``<stem>_misalignment.nii.gz`` ...): the moving image's stem.
        inputs: role -> path of the run's input files ("" or None for an input not given), hashed in the manifest.
        settings: what the manifest records of the method (its name and settings, the bundle version).
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        stem: str,
        inputs: Optional[Mapping[str, Any]] = None,
        settings: Optional[Mapping[str, Any]] = None,
    ) -> None:
        if not stem:
            raise ValueError("a result set needs the stem of its output names")
        self.output_dir = Path(output_dir)
        self.stem = stem
        self.inputs = {k: str(v) for k, v in dict(inputs or {}).items() if v}
        self.settings = dict(settings or {})
        self.lock_path = self.output_dir / f".{stem}.lock"
        self.manifest_path = self.output_dir / f"{stem}_{MANIFEST_SUFFIX}"
        self._staging: Optional[Path] = None
        self._started = ""
        self._created_dir = False

    @property
    def staging_dir(self) -> Path:
        """The hidden folder the writers write into (exists between ``open()`` and ``commit()``/``discard()``)."""
        if self._staging is None:
            raise RuntimeError("the result set is not open: call open() before writing")
        return self._staging

    def open(self) -> "ResultSet":
        """Probe the output folder, take the lock and create the staging folder; ``ResultSetError`` names
        ``--output_dir`` and the reason (a file in the way, no permission, another run writing the same stem)."""
        if self._staging is not None:
            return self
        folder = self.output_dir
        if folder.exists() and not folder.is_dir():
            raise ResultSetError(f"--output_dir {folder}: is a file, not a folder; give a folder for the results")
        self._created_dir = not folder.exists()
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ResultSetError(
                f"--output_dir {folder}: cannot create the folder ({error.strerror or error})"
            ) from None
        if not os.access(folder, os.W_OK | os.X_OK):
            raise ResultSetError(f"--output_dir {folder}: the folder is not writable by this user")
        self._take_lock()
        for leftover in folder.glob(f".{self.stem}.*.partial"):  # of runs that died: the lock is ours now
            shutil.rmtree(leftover, ignore_errors=True)
        staging = folder / f".{self.stem}.{uuid.uuid4().hex[:12]}.partial"
        try:
            staging.mkdir()
            probe = staging / ".probe"
            probe.write_bytes(b"probe")  # a read-only file system or a full disk shows here, before any work
            probe.unlink()
        except OSError as error:
            shutil.rmtree(staging, ignore_errors=True)
            self._release_lock()
            raise ResultSetError(
                f"--output_dir {folder}: cannot write into the folder ({error.strerror or error})"
            ) from None
        self._staging = staging
        self._started = _now()
        return self

    def _take_lock(self) -> None:
        """Create ``.<stem>.lock`` exclusively; a lock left by a process that no longer runs is taken over."""
        text = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": _now()})
        for _ in range(2):
            try:
                descriptor = os.open(self.lock_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._lock_holder()
                if holder is None:  # unreadable: being written by its run right now, or left by one that died
                    alive, holder = _age_s(self.lock_path) < LOCK_WRITE_GRACE_S, {"pid": "?", "started": "just now"}
                else:  # a run on another host cannot be checked: it counts as running
                    alive = holder.get("host") != socket.gethostname() or _process_alive(holder["pid"])
                if alive:
                    raise ResultSetError(
                        f"--output_dir {self.output_dir}: another run (pid {holder['pid']} on "
                        f"{holder.get('host', socket.gethostname())}, started {holder.get('started')}) is writing the "
                        f"results of {self.stem} there; wait for it to end or choose another --output_dir (remove "
                        f"{self.lock_path} if no such run exists)"
                    ) from None
                logger.warning("removing the stale lock %s of a run that no longer runs", self.lock_path)
                self.lock_path.unlink(missing_ok=True)
                continue
            except OSError as error:
                raise ResultSetError(
                    f"--output_dir {self.output_dir}: cannot write into the folder ({error.strerror or error})"
                ) from None
            with os.fdopen(descriptor, "w") as f:
                f.write(text)
            return
        raise ResultSetError(f"--output_dir {self.output_dir}: cannot take the lock {self.lock_path}")

    def _lock_holder(self) -> Optional[Dict[str, Any]]:
        try:
            holder = json.loads(self.lock_path.read_text())
            return holder if isinstance(holder.get("pid"), int) else None
        except (OSError, ValueError, AttributeError):
            return None  # unreadable: a lock whose writer died before writing it

    def _release_lock(self) -> None:
        holder = self._lock_holder()
        if holder is None or holder.get("pid") == os.getpid():
            self.lock_path.unlink(missing_ok=True)

    def earlier_manifest(self) -> Optional[Dict[str, Any]]:
        """The manifest of the run whose results are in place now, or None."""
        try:
            return json.loads(self.manifest_path.read_text())
        except (OSError, ValueError):
            return None

    def commit(self, extra: Optional[Mapping[str, Any]] = None) -> Path:
        """Write the manifest (settings, inputs and outputs with sizes and sha256, start and end time, ``extra``)
        and move the staged files into place together, removing the earlier run's files of this stem that were not
        written again; returns the manifest's path."""
        staging = self.staging_dir
        written = sorted(p.name for p in staging.iterdir() if p.is_file() and not p.name.startswith("."))
        foreign = [n for n in written if not n.startswith(f"{self.stem}_")]
        if foreign:
            raise RuntimeError(f"files {foreign} in the result set of {self.stem} do not start with its stem")
        earlier = self.earlier_manifest()
        manifest = {
            **self.settings,
            **dict(extra or {}),
            "inputs": {role: describe_file(path) for role, path in self.inputs.items()},
            "files": [
                {"name": n, **{k: v for k, v in describe_file(staging / n).items() if k != "path"}} for n in written
            ],
            "started": self._started,
            "finished": _now(),
        }
        (staging / self.manifest_path.name).write_text(json.dumps(manifest, indent=2) + "\n")
        if earlier is not None and earlier.get("inputs") and earlier.get("inputs") != manifest["inputs"]:
            logger.warning(
                "replacing the results of an earlier run of %s in %s made from other inputs", self.stem, self.output_dir
            )
        stale = {f"{self.stem}_{s}" for s in OUTPUT_SUFFIXES}
        if earlier is not None:
            stale |= {str(f.get("name")) for f in earlier.get("files", []) if isinstance(f, dict)}
        stale -= set(written) | {self.manifest_path.name}
        with deferred_signals():
            self.manifest_path.unlink(missing_ok=True)  # from here no manifest claims a set until the new one lands
            for name in written:
                os.replace(staging / name, self.output_dir / name)
            for name in sorted(stale):
                if "/" not in name and name.startswith(f"{self.stem}_"):
                    (self.output_dir / name).unlink(missing_ok=True)
            os.replace(staging / self.manifest_path.name, self.manifest_path)
        self._close()
        for name in written:
            logger.info("wrote %s", self.output_dir / name)
        return self.manifest_path

    def discard(self) -> None:
        """Remove the staging folder and release the lock (the results in place stay as they were); an output
        folder this run created and left empty is removed too."""
        if self._staging is None:
            return
        self._close()
        if self._created_dir:
            with contextlib.suppress(OSError):
                self.output_dir.rmdir()  # only if empty

    def _close(self) -> None:
        if self._staging is not None:
            shutil.rmtree(self._staging, ignore_errors=True)
            self._staging = None
            self._release_lock()


def verify_manifest(folder: str | os.PathLike, stem: str) -> Optional[Dict[str, Any]]:
    """The manifest ``<stem>_run.json`` in ``folder`` if every file it lists is there with its size and sha256,
    else None (an incomplete, mixed or edited set).

    Args:
        folder: the output folder.
        stem: the result set's stem (the moving image's).

    Returns:
        The manifest as a dictionary, or None.
    """
    folder = Path(folder)
    try:
        manifest = json.loads((folder / f"{stem}_{MANIFEST_SUFFIX}").read_text())
        files = manifest["files"]
        for entry in files:
            path = folder / entry["name"]
            if not path.is_file() or path.stat().st_size != entry["bytes"] or file_sha256(path) != entry["sha256"]:
                return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return manifest
