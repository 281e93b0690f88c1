"""A FUSE filesystem that loses every write not fsynced when the power goes (what LazyFS does).

LazyFS (the tool of Jepsen's NATS analysis) is C++ built from GitHub, which CI cannot reach;
this is the same idea on mfusepy (ctypes over Debian's libfuse3). It passes a backing
directory through, except file data: a write is kept in this process's memory and reaches
the backing file only when the file is fsynced (or fdatasynced). Killing this process is the
power failure: what was not synced is gone, the backing directory is the disk afterwards.

Metadata (create, rename, unlink, mkdir) goes straight through, as a journaling filesystem
would keep it; only data waits for fsync, which is what an application must ask for.

Run it as ``python -m tests.faults.lazyfs BACKING MOUNTPOINT``; tests use :class:`LazyMount`.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FUSERMOUNT = shutil.which("fusermount3") or shutil.which("fusermount")


def fuse_unavailable() -> str | None:
    """Why a FUSE mount cannot work here, or None when it can."""
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse"
    if FUSERMOUNT is None:
        return "no fusermount3 (apt-get install fuse3)"
    try:
        import mfusepy  # noqa: F401
    except (ImportError, OSError) as exc:  # libfuse missing raises OSError
        return f"mfusepy unusable: {exc}"
    return None


@dataclass
class _Pending:
    """Unsynced changes of one file, in order: ("w", offset, bytes) or ("t", length)."""

    size: int
    ops: list[tuple[str, int, bytearray]] = field(default_factory=list)

    def write(self, offset: int, data: bytes) -> None:
        last = self.ops[-1] if self.ops else None
        if last and last[0] == "w" and last[1] + len(last[2]) == offset:
            last[2].extend(data)  # appends coalesce: reads stay cheap
        else:
            self.ops.append(("w", offset, bytearray(data)))
        self.size = max(self.size, offset + len(data))

    def truncate(self, length: int) -> None:
        self.ops.append(("t", length, bytearray()))
        self.size = length

    def overlay(self, base: bytes, offset: int, size: int) -> bytes:
        buf = bytearray(base.ljust(size, b"\0"))
        end = offset + size
        for kind, at, data in self.ops:
            if kind == "t":
                if at < end:
                    start = max(at - offset, 0)
                    buf[start:] = bytes(size - start)
                continue
            lo, hi = max(at, offset), min(at + len(data), end)
            if lo < hi:
                buf[lo - offset : hi - offset] = data[lo - at : hi - at]
        return bytes(buf[: max(0, min(size, self.size - offset))])


def _operations() -> Any:
    import mfusepy

    class LazyFS(mfusepy.Operations):  # type: ignore[misc]
        use_ns = True

        def __init__(self, root: str) -> None:
            self.root = root
            self.pending: dict[int, _Pending] = {}

        def _p(self, path: str) -> str:
            return os.path.join(self.root, path.lstrip("/"))

        def _ino(self, path: str | None, fh: int | None) -> int:
            return os.fstat(fh).st_ino if fh is not None else os.lstat(self._p(path or "/")).st_ino

        def _pending(self, ino: int, fh: int | None, path: str | None) -> _Pending:
            if ino not in self.pending:
                size = (
                    os.fstat(fh).st_size
                    if fh is not None
                    else os.lstat(self._p(path or "/")).st_size
                )
                self.pending[ino] = _Pending(size)
            return self.pending[ino]

        def _sync(self, ino: int, fh: int) -> None:
            pending = self.pending.pop(ino, None)
            if pending is None:
                return
            for kind, at, data in pending.ops:
                if kind == "t":
                    os.ftruncate(fh, at)
                else:
                    os.pwrite(fh, data, at)
            # The backing directory survives our "power loss" anyway; its own fsync buys nothing.

        # -- metadata: straight through --------------------------------------------------
        def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
            st = os.fstat(fh) if fh is not None else os.lstat(self._p(path))
            attrs = {
                key: getattr(st, key)
                for key in (
                    "st_mode", "st_nlink", "st_uid", "st_gid", "st_size",
                    "st_atime_ns", "st_mtime_ns", "st_ctime_ns",
                )
            }  # fmt: skip
            for key in ("st_atime", "st_mtime", "st_ctime"):
                attrs[key] = attrs.pop(key + "_ns")
            pending = self.pending.get(st.st_ino)
            if pending is not None:
                attrs["st_size"] = pending.size
            return attrs

        def access(self, path: str, amode: int) -> int:
            if not os.access(self._p(path), amode):
                raise mfusepy.FuseOSError(errno.EACCES)
            return 0

        def readdir(self, path: str, fh: int) -> list[str]:
            return [".", "..", *os.listdir(self._p(path))]

        def mkdir(self, path: str, mode: int) -> int:
            os.mkdir(self._p(path), mode)
            return 0

        def rmdir(self, path: str) -> int:
            os.rmdir(self._p(path))
            return 0

        def unlink(self, path: str) -> int:
            st = os.lstat(self._p(path))
            if st.st_nlink <= 1:
                self.pending.pop(st.st_ino, None)  # the inode number may come back for a new file
            os.unlink(self._p(path))
            return 0

        def rename(self, old: str, new: str) -> int:
            target = self._p(new)
            if os.path.exists(target) and os.lstat(target).st_nlink <= 1:
                self.pending.pop(os.lstat(target).st_ino, None)
            os.rename(self._p(old), target)
            return 0

        def link(self, target: str, source: str) -> int:
            os.link(self._p(source), self._p(target))
            return 0

        def symlink(self, target: str, source: str) -> int:
            os.symlink(source, self._p(target))
            return 0

        def readlink(self, path: str) -> str:
            return os.readlink(self._p(path))

        def chmod(self, path: str, mode: int) -> int:
            os.chmod(self._p(path), mode)
            return 0

        def chown(self, path: str, uid: int, gid: int) -> int:
            os.chown(self._p(path), uid, gid)
            return 0

        def utimens(self, path: str, times: tuple[int, int] | None = None) -> int:
            os.utime(self._p(path), ns=times) if times else os.utime(self._p(path))
            return 0

        def statfs(self, path: str) -> dict[str, int]:
            st = os.statvfs(self._p(path))
            return {
                key: getattr(st, key)
                for key in (
                    "f_bavail", "f_bfree", "f_blocks", "f_bsize", "f_favail",
                    "f_ffree", "f_files", "f_flag", "f_frsize", "f_namemax",
                )
            }  # fmt: skip

        # -- data: held until fsync ------------------------------------------------------
        def open(self, path: str, flags: int) -> int:
            # O_TRUNC arrives as a separate truncate; O_APPEND offsets come from the kernel.
            return os.open(
                self._p(path), (flags & ~(os.O_TRUNC | os.O_APPEND | os.O_ACCMODE)) | os.O_RDWR
            )

        def create(self, path: str, mode: int, fi: Any = None) -> int:
            return os.open(self._p(path), os.O_RDWR | os.O_CREAT, mode)

        def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
            base = os.pread(fh, size, offset)
            pending = self.pending.get(os.fstat(fh).st_ino)
            return base if pending is None else pending.overlay(base, offset, size)

        def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
            self._pending(os.fstat(fh).st_ino, fh, path).write(offset, data)
            return len(data)

        def truncate(self, path: str, length: int, fh: int | None = None) -> int:
            self._pending(self._ino(path, fh), fh, path).truncate(length)
            return 0

        def fsync(self, path: str, datasync: int, fh: int) -> int:
            self._sync(os.fstat(fh).st_ino, fh)
            return 0

        def flush(self, path: str, fh: int) -> int:
            return 0  # close() is no promise of durability

        def release(self, path: str, fh: int) -> int:
            os.close(fh)
            return 0

        def destroy(self, path: str) -> None:
            """A clean unmount writes everything back, as a clean shutdown would."""
            for ino in list(self.pending):
                for dirpath, _dirs, files in os.walk(self.root):
                    for name in files:
                        full = os.path.join(dirpath, name)
                        if os.lstat(full).st_ino == ino:
                            fd = os.open(full, os.O_RDWR)
                            try:
                                self._sync(ino, fd)
                            finally:
                                os.close(fd)
            self.pending.clear()

    return LazyFS


class LazyMount:
    """Runs the filesystem in a child process: ``start()``, ``power_loss()``, ``stop()``.

    ``power_loss()`` kills the child with SIGKILL (its unsynced writes die with it) and
    detaches the dead mount; ``start()`` again mounts the backing directory as the disk
    left it. Kill every process with files open under the mount first.
    """

    def __init__(self, backing: Path, mountpoint: Path) -> None:
        self.backing = backing
        self.mountpoint = mountpoint
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 15.0) -> None:
        self.backing.mkdir(parents=True, exist_ok=True)
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.faults.lazyfs", str(self.backing), str(self.mountpoint)],
            stderr=subprocess.PIPE,
            cwd=Path(__file__).resolve().parents[2],
        )
        deadline = time.monotonic() + timeout
        while not os.path.ismount(self.mountpoint):
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise RuntimeError(f"lazyfs exited with {self.proc.returncode}: {err.strip()}")
            if time.monotonic() > deadline:
                self.power_loss()
                raise RuntimeError(f"lazyfs did not mount {self.mountpoint} in {timeout}s")
            time.sleep(0.05)

    def power_loss(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
            self.proc = None
        self._detach(lazy=True)

    def stop(self) -> None:
        if self.proc is None:
            return
        self._detach(lazy=False)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.power_loss()
        self.proc = None

    def _detach(self, *, lazy: bool) -> None:
        assert FUSERMOUNT is not None
        args = [FUSERMOUNT, "-u", *(["-z"] if lazy else []), str(self.mountpoint)]
        subprocess.run(args, check=False, capture_output=True)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m tests.faults.lazyfs BACKING MOUNTPOINT", file=sys.stderr)
        return 2
    import mfusepy

    backing, mountpoint = (os.path.abspath(a) for a in argv)
    # One thread: operations stay ordered and the pending map needs no lock.
    mfusepy.FUSE(_operations()(backing), mountpoint, foreground=True, nothreads=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
