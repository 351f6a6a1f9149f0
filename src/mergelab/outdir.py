"""Output directories that appear whole or not at all, and never at another run's expense.

Every command that writes a directory (merge, cocktail, grid, sfa, demo) builds it in a
temporary sibling and publishes it with one atomic rename at the end:

- without ``force`` the rename refuses an existing target (``renameat2(RENAME_NOREPLACE)``),
  so of two runs into one new directory exactly one wins and the other gets a clear error;
- with ``force`` the finished directory is atomically exchanged with the old one
  (``RENAME_EXCHANGE``), which is deleted only afterwards;
- a failure, Ctrl-C or SIGTERM removes the temporary directory; after a ``kill -9`` the next
  run into the same target removes temporary directories whose owner process is gone (the
  owner's host, pid and start time are part of the directory's name) and says so.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import logging
import os
import re
import shutil
import signal
import socket
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

from mergelab.errors import MergelabError

log = logging.getLogger("mergelab")

_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def check_output_dir(out_dir: str | Path, force: bool, inputs: Iterable[str | Path] = ()) -> Path:
    """Check that ``out_dir`` may be written; return its resolved absolute path.

    Refuses: an existing directory unless ``force``; an existing file (always); a dangling
    symlink; a location that is not writable; and any output that holds, or lies inside, an
    input model's directory (symlinks resolved), because writing it would change that input.
    """
    given = Path(out_dir).expanduser()
    if given.is_symlink() and not given.exists():
        raise MergelabError(f"output path {given} is a symlink to {os.readlink(given)}, which does not exist; "
                            f"remove the link or choose another output path")
    out = given.resolve()
    for source in inputs:
        source = Path(source).expanduser().resolve()
        if out == source or out in source.parents:
            raise MergelabError(f"output directory {out} holds input model {source}; choose another output directory")
        if source.is_dir() and source in out.parents:
            raise MergelabError(f"output directory {out} lies inside input model {source}, and writing it would "
                                f"change that model; choose a directory outside it")
    if out.exists() and not out.is_dir():
        raise MergelabError(f"output path {out} exists and is not a directory; remove it or choose another path")
    if out.exists() and not force:
        raise MergelabError(f"output directory {out} already exists; remove it, choose another, or pass --force")
    check_writable(out)
    return out


def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path("/")


def check_writable(out: str | Path, what: str = "") -> Path:
    """Check that ``out`` (a file or directory to be created) can be written: its nearest
    existing ancestor is a directory in which a file can really be created. Root ignores
    permission bits, so only a real attempt tells (a read-only file system refuses even root).
    Returns ``out`` as a Path."""
    out = Path(out)
    what = f"{what} " if what else ""
    anchor = _nearest_existing(out.parent)
    if not anchor.is_dir():
        raise MergelabError(f"cannot create {what}{out}: {anchor} is a file, not a directory; "
                            f"choose another path")
    try:
        handle, probe = tempfile.mkstemp(prefix=".mergelab-probe-", dir=anchor)
        os.close(handle)
        os.unlink(probe)
    except OSError as exc:
        raise MergelabError(f"cannot write {what}{out}: {anchor} is not writable ({exc.strerror}); "
                            f"choose another location") from None
    return out


def check_output_file(out: str | Path, force: bool = True, what: str = "output file") -> Path:
    """Check a single output file before any work: not a directory, not an existing file unless
    ``force``, and in a writable place."""
    out = Path(out).expanduser()
    if out.is_dir():
        raise MergelabError(f"{what} {out} is a directory; give a file name")
    if out.exists() and not force:
        raise MergelabError(f"{what} {out} already exists; remove it, choose another, or pass --force")
    return check_writable(out, what)


def check_free_space(out: Path, needed: int) -> None:
    """Refuse to start when the output's file system has less than ``needed`` bytes free."""
    anchor = _nearest_existing(Path(out).parent)
    free = shutil.disk_usage(anchor).free
    if needed > free:
        raise MergelabError(f"not enough disk space for {out}: it needs {_gb(needed)} but {anchor} has {_gb(free)} "
                            f"free; free some space or choose another location")


def _gb(size: int) -> str:
    return f"{size / 1e9:.2f} GB" if size >= 1e7 else f"{size / 1e6:.2f} MB"


# -- owners of temporary directories ---------------------------------------------------------
def _host_tag() -> str:
    return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]


def _start_time(pid: int) -> str | None:
    """The process' start time in clock ticks since boot (Linux), which tells a live process
    from a later one that reused its pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _alive(pid: int, start: str) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    now = _start_time(pid)
    return now is None or start in ("x", now)


_TEMP = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-(?P<start>\d+|x)-\w+$")


def _temp_prefix(out: Path) -> str:
    pid = os.getpid()
    return f".{out.name}.tmp-{_host_tag()}-{pid}-{_start_time(pid) or 'x'}-"


def remove_stale_temporaries(out: Path) -> list[Path]:
    """Remove ``.NAME.tmp-*`` siblings of ``out`` left by processes of this host that are gone."""
    removed = []
    parent = Path(out).parent
    if not parent.is_dir():
        return removed
    host = _host_tag()
    for item in parent.glob(f".{glob_escape(out.name)}.tmp-*"):
        match = _TEMP.match(item.name)
        if not match or match["name"] != out.name or match["host"] != host or not item.is_dir():
            continue
        if _alive(int(match["pid"]), match["start"]):
            continue
        shutil.rmtree(item, ignore_errors=True)
        if not item.exists():
            removed.append(item)
            log.warning("removed %s, a temporary directory left by process %s, which is gone (killed?)",
                        item, match["pid"])
    return removed


def glob_escape(text: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", text)


# -- publishing ------------------------------------------------------------------------------
def _renameat2(source: Path, target: Path, flags: int) -> bool:
    """Linux renameat2; False where the kernel, libc or file system lacks it."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        function = libc.renameat2
    except (OSError, AttributeError):
        return False
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if function(_AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(target), flags) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(target))


def publish(tmp: Path, out: Path, force: bool) -> None:
    """Move the finished ``tmp`` to ``out`` atomically (see the module docstring)."""
    try:
        if force and out.is_dir() and not out.is_symlink():
            if _renameat2(tmp, out, _RENAME_EXCHANGE):
                shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old output
                return
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            out.rename(old / out.name)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
            return
        if not _renameat2(tmp, out, _RENAME_NOREPLACE):
            if out.exists() or out.is_symlink():  # without renameat2, a last look narrows the race
                raise OSError(errno.EEXIST, os.strerror(errno.EEXIST), str(out))
            os.rename(tmp, out)  # POSIX refuses to replace a non-empty directory
    except OSError as exc:
        if exc.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
            raise MergelabError(f"output directory {out} appeared while this run was writing (another run finished "
                                f"first); it was left as it is and this run's result was discarded; "
                                f"choose another output directory or pass --force") from None
        raise


class _Terminated(SystemExit):
    """SIGTERM, raised where the process was, so that cleanup code runs as for Ctrl-C."""


@contextmanager
def terminate_as_exit() -> Iterator[None]:
    """While the block runs, SIGTERM raises ``SystemExit(143)`` instead of killing the process
    on the spot (main thread only, and only if nobody else handles SIGTERM)."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None):
        yield
        return

    def handler(signum, frame):
        raise _Terminated(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def atomic_directory(out_dir: str | Path, force: bool = False, *, inputs: Iterable[str | Path] = (),
                     size: int | None = None) -> Iterator[Path]:
    """Yield a temporary sibling of ``out_dir``; publish it as ``out_dir`` only if the block
    succeeds. ``size``: bytes the block will write, checked against the free space first.

    Example:
        >>> with atomic_directory("results") as tmp:  # doctest: +SKIP
        ...     (tmp / "results.json").write_text("{}")
    """
    out = check_output_dir(out_dir, force, inputs)
    remove_stale_temporaries(out)
    if size is not None:
        check_free_space(out, size)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(out), dir=out.parent))
    except OSError as exc:
        raise MergelabError(f"cannot create {out}: {exc.strerror} ({exc.filename}); choose another location") from None
    with terminate_as_exit():
        try:
            yield tmp
            publish(tmp, out, force)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            full = exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
            why = "the disk is full" if full else exc.strerror or str(exc)
            raise MergelabError(f"writing {out} failed: {why} ({exc.filename or tmp}); nothing was written to "
                                f"{out}" + ("; free some space or choose another location" if full else "")) from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
