"""A lock file for a directory that one run at a time may write (a workdir, a latent cache).

Two runs in one workdir each exit 0 while the second's files replace the first's; two encoders on one
cache directory write the same shards. The lock is a file created with ``O_EXCL`` holding the host, the
pid and that process's start time. A second run is refused with a :class:`DirectoryLocked` naming them.
A lock whose process is gone (same host, no such pid, or the pid now belongs to a process started at
another time) is stale: it is taken over with a note. A lock of another host cannot be checked from here
and is never taken over: the message says which file to remove once that run is known to be dead.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time

from shelllcc.errors import UserError

LOCK_FILE = ".lock"


class DirectoryLocked(UserError):
    """Another live run holds the directory's lock."""


def _start_time(pid: int) -> str | None:
    # field 22 of /proc/<pid>/stat (after the parenthesised command name, which may hold spaces): the
    # process's start in clock ticks since boot; it tells a reused pid from the lock's holder
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, started: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass                    # exists, owned by someone else
    now = _start_time(pid)
    return started is None or now is None or now == started


class DirectoryLock:
    """``with DirectoryLock(directory, what="workdir"):`` holds ``directory/.lock`` for the block."""

    def __init__(self, directory: str, what: str = "directory", name: str = LOCK_FILE):
        self.directory = os.path.abspath(directory)
        self.path = os.path.join(self.directory, name)
        self.what = what
        self.held = False
        self.me = {"host": socket.gethostname(), "pid": os.getpid(), "started": _start_time(os.getpid()),
                   "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": " ".join(sys.argv)}

    def _read(self) -> dict | None:
        try:
            with open(self.path) as f:
                return json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}           # half-written by a process killed between create and write, or damaged

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(self.me, f)
        return True

    def acquire(self) -> "DirectoryLock":
        os.makedirs(self.directory, exist_ok=True)
        for _ in range(5):      # each pass either takes the lock or removes one stale holder
            if self._create():
                self.held = True
                return self
            holder = self._read()
            if holder is None:
                continue        # released in between
            host, pid = holder.get("host"), holder.get("pid")
            if holder and host != self.me["host"]:
                raise DirectoryLocked(
                    f"{self.what} {self.directory} is in use by pid {pid} on host {host} (lock {self.path}, since "
                    f"{holder.get('since')}); if that run is dead, remove the lock file")
            if holder and isinstance(pid, int) and _alive(pid, holder.get("started")):
                raise DirectoryLocked(
                    f"{self.what} {self.directory} is in use by pid {pid} on this host (lock {self.path}, since "
                    f"{holder.get('since')}: {holder.get('command', '')[:120]}); wait for it or use another {self.what}")
            if holder == {} and time.time() - os.path.getmtime(self.path) < 5:
                time.sleep(0.2)          # possibly being written right now by its creator
                continue
            # stale: renamed away first, so of two runs taking it over only one removes it
            stale = f"{self.path}.stale.{os.getpid()}"
            try:
                os.rename(self.path, stale)
            except FileNotFoundError:
                continue
            try:
                with open(stale) as f:
                    moved = json.load(f)
            except (OSError, ValueError):
                moved = {}
            if moved != holder:
                # another run took the stale lock over between our read and our rename: give its lock back
                try:
                    os.link(stale, self.path)
                except FileExistsError:
                    pass
                os.remove(stale)
                continue
            os.remove(stale)
            print(f"note: took over the stale lock {self.path} of pid {pid} on {host or 'an unknown host'} "
                  "(that process is gone)", file=sys.stderr, flush=True)
        raise DirectoryLocked(f"could not take the lock {self.path} of {self.what} {self.directory}")

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        holder = self._read()
        if holder and holder.get("pid") == self.me["pid"] and holder.get("host") == self.me["host"]:
            os.remove(self.path)

    def __enter__(self) -> "DirectoryLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


__all__ = ["DirectoryLock", "DirectoryLocked", "LOCK_FILE"]
