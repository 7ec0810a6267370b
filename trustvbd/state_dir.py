"""The trusted state directory belongs to the one who runs `up`, and to no one else.

Like ssh's StrictModes: `up` refuses a state directory that another user can write,
or that another user could replace (a directory on the way to it that others may
write, unless it is sticky like /tmp, or that belongs to someone other than root
or us). What others may only read is tightened on the spot: the directory and
everything in it become 0700/0600 (0711 for the directory and guests/ when a guest
socket belongs to another user, who must be able to reach it but not to list it),
and `up` runs with umask 077 so whatever it creates later is private too.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

from trustvbd.config import Config

log = logging.getLogger("trustvbd.hv")


class UnsafePath(Exception):
    """A path others could write or replace; the message names it and the fix."""


def _check_ancestor(path: Path, state_dir: Path, me: int) -> None:
    st = os.stat(path)
    if st.st_uid not in (0, me):
        raise UnsafePath(f"{path} belongs to uid {st.st_uid}, who could replace the state"
                         f" directory {state_dir}; choose a state_dir under a directory owned by"
                         " you or root")
    if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
        raise UnsafePath(f"{path} is writable by others (mode {stat.S_IMODE(st.st_mode):o}), who"
                         f" could replace the state directory {state_dir}; fix: chmod go-w"
                         f" {path}")


def _tighten(path: Path, mode: int, ours: int = 0) -> None:
    """Take away what `mode` does not allow; say so unless only `ours` went: bits that
    `up` itself adds while it runs."""
    st = os.lstat(path)
    if stat.S_ISSOCK(st.st_mode) or stat.S_ISLNK(st.st_mode):
        return  # sockets get their own owner and mode when `up` makes them; links are not followed
    extra = stat.S_IMODE(st.st_mode) & ~mode & 0o777
    if extra:
        os.chmod(path, stat.S_IMODE(st.st_mode) & mode)
        if extra & ~ours:
            log.info("tightened %s to mode %o", path, stat.S_IMODE(st.st_mode) & mode)


def secure_state_dir(config: Config) -> None:
    """Refuse an unsafe state directory; make a safe one private. Call before anything starts."""
    os.umask(0o077)
    me = os.geteuid()
    state_dir = config.state_dir
    for ancestor in reversed(state_dir.parents):
        _check_ancestor(ancestor, state_dir, me)
    st = os.lstat(state_dir)
    if st.st_uid != me:
        raise UnsafePath(f"state directory {state_dir} belongs to uid {st.st_uid}, not to you"
                         f" (uid {me}); fix: chown {me} {state_dir}, or use another state_dir")
    if st.st_mode & 0o022:
        raise UnsafePath(f"state directory {state_dir} is writable by others (mode"
                         f" {stat.S_IMODE(st.st_mode):o}): they could have changed the trusted"
                         f" state; check its contents, then fix: chmod 700 {state_dir}")
    others = any(g.uid is not None and g.uid != me for g in config.guests.values())
    if others:
        for ancestor in state_dir.parents:
            if not os.stat(ancestor).st_mode & 0o001:
                log.warning("%s does not let other users through (no o+x): guests with a `user`"
                            " cannot reach their sockets in %s; fix: chmod o+x %s",
                            ancestor, state_dir / "guests", ancestor)
    reach = 0o711 if others else 0o700
    if stat.S_IMODE(st.st_mode) != reach:
        os.chmod(state_dir, reach)  # 0711: guest users traverse to their sockets, list nothing
    for root, dirs, files in os.walk(state_dir):
        for name in dirs:
            path = Path(root) / name
            # STATE/disks: group x is how the last `up` let its encryption domains through
            # (open_state_dir_to_trusted_domains); taken away until this one does the same.
            _tighten(path, reach if path == state_dir / "guests" else 0o700,
                     ours=0o010 if path == state_dir / "disks" else 0)
        for name in files:
            _tighten(Path(root) / name, 0o600)
    guests = state_dir / "guests"
    if others:
        guests.mkdir(mode=0o711, exist_ok=True)
        os.chmod(guests, 0o711)
