"""Slot directories on the host: how a warm (pre-started) container gets its chat's
directory at claim time without a restart.

Every warm container bind-mounts its own slot directory, `<sandbox.slots_root>/<session_id>`,
at the *parent* of `sandbox.chat_mount_path` (`/workspace` for `/workspace/chat`) with
`rslave` propagation. The slot holds one empty, root-owned directory named like the chat
mount path's last part (`chat`): the mount point. The slots root is made a shared mount
point of its own, so a bind mount made on the host over `<slot>/chat` propagates into the
one container that binds the slot: the chat's directory appears at the chat mount path
within a few milliseconds, and nothing else of the host does.

The claim mounts on a directory *inside* the slot, not on the slot itself, because that is
what gVisor sees too: its gofer serves the slot from the directory it opened when the
container started, so a mount over the slot itself stays invisible inside, while a lookup of
a name within it finds the mount made there (measured; runc sees both). So the pool works
under runc and runsc alike.

A claim writes a marker `<session_id>.chat` holding the chat id first, created
exclusively: it records which chat a warm container serves (its labels, fixed at creation,
cannot), and two claims of one slot for different chats cannot both succeed.

Everything here is synchronous system calls on local paths (microseconds); the driver runs it
on its thread pool. Needs CAP_SYS_ADMIN (root): `prepare()` says why not when it cannot.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import logging
import os
import shutil
import time
from pathlib import Path

from shared.errors import SandboxStartFailed
from shared.subjects import canonical_chat_id

log = logging.getLogger(__name__)

_MS_BIND = 4096
_MS_REC = 16384
_MS_SHARED = 1 << 20
_MNT_DETACH = 2
_MARKER = ".chat"

_libc: ctypes.CDLL | None = None


def _c() -> ctypes.CDLL:
    global _libc  # noqa: PLW0603 - loaded once, on first use
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    return _libc


def _mount(source: str, target: str, flags: int) -> None:
    if _c().mount(source.encode(), target.encode(), None, flags, None) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"mount {source} on {target}: {os.strerror(code)}")


def _umount(target: str) -> None:
    if _c().umount2(target.encode(), _MNT_DETACH) != 0:
        code = ctypes.get_errno()
        if code in (errno.EINVAL, errno.ENOENT):  # not a mount point (any more)
            return
        raise OSError(code, f"umount {target}: {os.strerror(code)}")


def _mount_points() -> set[str]:
    points: set[str] = set()
    with open("/proc/self/mountinfo", encoding="utf-8") as info:  # noqa: PTH123 - a kernel file
        for line in info:
            fields = line.split(" ")
            if len(fields) > 4:  # noqa: PLR2004 - the mount point is the fifth field
                points.add(fields[4].replace("\\040", " "))
    return points


def _is_shared(path: str) -> bool:
    with open("/proc/self/mountinfo", encoding="utf-8") as info:  # noqa: PTH123 - a kernel file
        for line in info:
            fields = line.split(" ")
            if len(fields) > 6 and fields[4] == path:  # noqa: PLR2004 - optional fields start at the seventh
                optional = fields[6 : fields.index("-")]
                if any(f.startswith("shared:") for f in optional):
                    return True
    return False


class SlotMounts:
    def __init__(self, root: str | Path, chat_dir_name: str = "chat") -> None:
        if not chat_dir_name or "/" in chat_dir_name or chat_dir_name in {".", ".."}:
            raise ValueError(f"not a directory name: {chat_dir_name!r}")
        self.root = Path(root).resolve()
        self.chat_dir_name = chat_dir_name  # the chat mount path's last part

    def prepare(self) -> str | None:
        """Make the slots root a shared mount point; None when done, else why it cannot be
        (the warm pool is then off)."""
        root = str(self.root)
        try:
            self.root.mkdir(mode=0o755, parents=True, exist_ok=True)
            if root not in _mount_points():
                _mount(root, root, _MS_BIND)
            if not _is_shared(root):
                _mount("none", root, _MS_REC | _MS_SHARED)
        except OSError as exc:
            return f"cannot make {root} (sandbox.slots_root) a shared mount point: {exc}"
        return None

    def in_use(self) -> bool:
        """Whether any slot or marker is here (a warm container, claimed or not, of any runtime
        of this host)."""
        try:
            return any(True for _ in self.root.iterdir())
        except FileNotFoundError:
            return False

    def retire(self) -> bool:
        """Undo `prepare` when nothing uses the slots root any more (a runtime stopping
        cleanly, its unclaimed warm containers removed); True when it was unmounted."""
        root = str(self.root)
        if self.in_use() or root not in _mount_points():
            return False
        try:
            _umount(root)
        except OSError:
            log.warning("could not unmount the slots root %s", root, exc_info=True)
            return False
        return True

    def slot(self, session_id: str) -> Path:
        return self.root / canonical_chat_id(session_id)  # a uuid: never a path of its own

    def mount_point(self, session_id: str) -> Path:
        """Where a claim mounts the chat's directory: `<slot>/<chat dir name>`."""
        return self.slot(session_id) / self.chat_dir_name

    def _marker(self, session_id: str) -> Path:
        return self.root / f"{canonical_chat_id(session_id)}{_MARKER}"

    def make(self, session_id: str) -> Path:
        """A new slot directory holding only the empty mount point (both root's, 0755: the
        sandbox's user can write in neither before its chat is attached)."""
        path = self.slot(session_id)
        try:
            path.mkdir(mode=0o755, exist_ok=True)
            self.mount_point(session_id).mkdir(mode=0o755, exist_ok=True)
        except OSError as exc:
            raise SandboxStartFailed(f"cannot make the warm slot {path} (sandbox.slots_root): {exc}") from exc
        return path

    def chat_of(self, session_id: str) -> str | None:
        """The chat a claimed slot serves; None for an unclaimed one."""
        try:
            return self._marker(session_id).read_text(encoding="utf-8").strip() or None
        except (OSError, ValueError):
            return None

    def attach(self, session_id: str, chat_dir: Path, chat_id: str) -> None:
        """Claim the slot for the chat and mount its directory there; again for the same chat
        is a no-op, for another chat an error (nothing changed)."""
        marker = self._marker(session_id)
        slot = self.slot(session_id)
        point = self.mount_point(session_id)
        try:
            fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            claimed = self.chat_of(session_id)
            if claimed != chat_id:
                raise SandboxStartFailed(
                    f"warm container of session {session_id} serves chat {claimed}; not attached"
                ) from None
        except OSError as exc:
            raise SandboxStartFailed(f"cannot claim the warm slot {slot}: {exc}") from exc
        else:
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                out.write(chat_id)
        try:
            if self._attached(point, chat_dir):
                return
            _mount(str(chat_dir), str(point), _MS_BIND)
        except OSError as exc:
            raise SandboxStartFailed(f"cannot mount {chat_dir} on the warm slot {point}: {exc}") from exc

    @staticmethod
    def _attached(slot: Path, chat_dir: Path) -> bool:
        seen, wanted = slot.stat(), chat_dir.stat()
        return (seen.st_dev, seen.st_ino) == (wanted.st_dev, wanted.st_ino)

    def release(self, session_id: str) -> None:
        """Unmount what is attached, remove the slot and its marker (a missing one is fine).
        The slot's tree is removed only once no mount is left in it: a chat's directory is
        never reached through it."""
        slot = self.slot(session_id)
        with contextlib.suppress(FileNotFoundError):
            if slot.exists():
                inside = f"{slot}/"
                # Stacked attaches (never made by us, but cheap to be sure of) come off one by
                # one, deepest first; a slot from before mount points moved inside has its own.
                for _ in range(8):
                    points = sorted(
                        (p for p in _mount_points() if p == str(slot) or p.startswith(inside)), key=len, reverse=True
                    )
                    if not points:
                        break
                    for point in points:
                        _umount(point)
                if any(p == str(slot) or p.startswith(inside) for p in _mount_points()):
                    raise OSError(errno.EBUSY, f"{slot} still has a mount in it; not removed")
                # Anything else in it was written there by the container (a root sandbox user).
                shutil.rmtree(slot)
        with contextlib.suppress(FileNotFoundError):
            self._marker(session_id).unlink()

    def stale(self, present: set[str], older_than: float) -> set[str]:
        """Sessions with a slot or marker here, but not in `present`, untouched for that long."""
        cutoff = time.time() - older_than
        found: set[str] = set()
        with contextlib.suppress(FileNotFoundError):
            for entry in self.root.iterdir():
                try:
                    session_id = canonical_chat_id(entry.name.removesuffix(_MARKER))
                    if session_id not in present and entry.lstat().st_mtime < cutoff:
                        found.add(session_id)
                except (ValueError, FileNotFoundError):
                    continue
        return found


def unmount_all(root: str | Path) -> int:
    """Unmount every mount at or under `root` (deepest first): for tests and operators
    retiring a slots root. How many were unmounted."""
    base = str(Path(root).resolve())
    points = sorted((p for p in _mount_points() if p == base or p.startswith(base + "/")), key=len, reverse=True)
    done = 0
    for point in points:
        with contextlib.suppress(OSError):
            _umount(point)
            done += 1
    return done
