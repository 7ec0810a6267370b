"""Opening a CryptDisk: unlock its trusted state, check that each replica fits, judge
and recover the replicas (crypt_survey.py, crypt_open.py), build the disk and commit once.

A driver out of space at open does not stop it: reads are served and writes answered
ENOSPC until a commit goes through (crypt_write.wait_for_space).
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from trustvbd.blockdev import Backend, BlockError
from trustvbd.blocks.aead_pool import AeadPool
from trustvbd.blocks.crypt_commit import Commits
from trustvbd.blocks.crypt_open import recover
from trustvbd.blocks.crypt_survey import describe
from trustvbd.blocks.disk_state import DiskState, TrustedStateError
from trustvbd.blocks.integrity import IntegrityEvents, NameDisk, ReplicaRefusedError
from trustvbd.blocks.leaf_pages import LeafPages
from trustvbd.blocks.replica import State
from trustvbd.blocks.replica_set import ReplicaSet
from trustvbd.blocks.tree_file import TreeFile, TreeFileError
from trustvbd.crypt.aead import BlockCipher
from trustvbd.crypt.keys import Kek
from trustvbd.crypt.superblock import Layout
from trustvbd.fileops import FileOps

if TYPE_CHECKING:
    from trustvbd.blocks.crypt_layer import CryptDisk

log = logging.getLogger("trustvbd.blocks.crypt_layer")


async def open_disk(cls: type[CryptDisk], state_dir: Path, disk_name: str,
                    replicas: list[tuple[str, Backend]], kek: Kek,
                    on_integrity_event: Callable[[dict], None] | None, aead: AeadPool | None,
                    files: FileOps, leaf_cache_pages: int, lag: float,
                    shown_dir: Path | None = None, name_disk: NameDisk | None = None
                    ) -> CryptDisk:
    """CryptDisk.open_mirrored (which says what it does and raises)."""
    state = DiskState(Path(state_dir), disk_name, files)  # files: tests cut the power there
    rs: ReplicaSet | None = None
    tree: TreeFile | None = None
    try:
        state.check_format()
        secrets = state.unlock(kek)
        anchor = state.read_anchor()
        if anchor.disk_id != secrets.disk_id:
            raise TrustedStateError(
                f"{state.anchor_path} belongs to disk id {anchor.disk_id.hex()}, but the keys "
                f"are for disk id {secrets.disk_id.hex()}; the state directory is mixed up")
        lay = Layout(anchor.logical_size)
        for replica_name, replica in replicas:
            who = describe(disk_name, replica_name)
            if replica.capabilities.read_only:
                raise ReplicaRefusedError(
                    f"{who} is read-only; an encrypted disk needs a writable replica")
            if replica.size < lay.physical_size:
                raise ReplicaRefusedError(
                    f"{who} is {replica.size} bytes, but disk {disk_name!r} ({lay.logical_size} "
                    f"bytes) needs {lay.physical_size}; grow the backing file")
        events = IntegrityEvents(disk_name, on_integrity_event)
        tree = _open_tree(state, disk_name, lay, anchor.root, files)
        leaves = LeafPages(disk_name, lay, tree, leaf_cache_pages, events.report)
        cipher = BlockCipher(secrets.data_key, secrets.disk_id)
        opened = await recover(replicas, disk_name, state, anchor, secrets.public_key, cipher,
                               leaves, lag, name_disk)
        for replica_name, e in opened.events:
            events.report(e.what, replica_name, e.blocks, e.message)
        rs = ReplicaSet(disk_name, lay, opened.replicas)
        rs.epoch, rs.lag, rs.name_disk = anchor.epoch, lag, name_disk
        for r in rs.replicas:  # said once here; rechecked in the background, quietly
            if r.state is State.FAILED:
                log.error("disk %s: replica %s refused: %s", disk_name, r.name, r.last_error)
        leaves.replicas = rs
        commits = Commits(state, shown_dir or Path(state_dir), disk_name, anchor, secrets, leaves, tree, {})
        disk = cls(state, disk_name, rs, secrets, commits, events, aead)
        try:
            await disk._commit(force=True)
        except BlockError as exc:
            if exc.errno != errno.ENOSPC:
                raise
            # The driver is out of space: serve reads (they need nothing written) and
            # answer writes ENOSPC until this commit goes through (crypt_write.wait_for_space).
            who = (describe(disk_name, replicas[0][0]) + " is" if len(replicas) == 1 else
                   f"every replica of disk {disk_name!r} is")
            disk._out_of_space = (f"disk {disk_name!r}: {who} out of space, so nothing can "
                                  "be written until space is freed under it")
            log.error("%s; reads are served", disk._out_of_space)
    except BaseException:
        state.close()
        if tree is not None:
            tree.close()
        raise
    rs.recovery.start()
    return disk


def _open_tree(state: DiskState, disk: str, lay: Layout, root: bytes, files: FileOps) -> TreeFile:
    try:
        return TreeFile(state.tree_path, disk, lay.leaf_pages, root, files)
    except TreeFileError as exc:
        raise TrustedStateError(str(exc)) from exc
