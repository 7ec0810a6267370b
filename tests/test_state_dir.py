"""The state directory's walls (as ssh's StrictModes), and the TLS directory's keys."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import pytest

from trustvbd.config_file import load_config
from trustvbd.crypt import x509
from trustvbd.crypt.tls import TlsSetupError, check_tls_dir
from trustvbd.state_dir import UnsafePath, secure_state_dir

CONFIG = """
state_dir = "state"
[[guest]]
name = "vm1"
label = "A"
{extra}
"""


def setup(root: Path, extra: str = "") -> Path:
    (root / "state" / "disks").mkdir(parents=True)
    (root / "c.toml").write_text(CONFIG.format(extra=extra))
    return root / "c.toml"


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def test_readable_state_is_made_private(short_tmp: Path) -> None:
    config = load_config(setup(short_tmp))
    os.chmod(short_tmp / "state", 0o755)
    (short_tmp / "state" / "disks" / "anchor").write_bytes(b"x")
    os.chmod(short_tmp / "state" / "disks" / "anchor", 0o644)
    os.chmod(short_tmp / "state" / "disks", 0o755)
    old = os.umask(0o022)
    try:
        secure_state_dir(config)
        assert os.umask(0o022) == 0o077  # whatever `up` makes later is private too
    finally:
        os.umask(old)
    assert mode(short_tmp / "state") == 0o700
    assert mode(short_tmp / "state" / "disks") == 0o700
    assert mode(short_tmp / "state" / "disks" / "anchor") == 0o600


def test_a_user_guest_gets_a_traversable_state_dir(short_tmp: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    config = load_config(setup(short_tmp, "user = 65534"))
    os.chmod(short_tmp, 0o700)  # the user could not get through to its socket
    old = os.umask(0o022)
    try:
        secure_state_dir(config)
    finally:
        os.umask(old)
    assert mode(short_tmp / "state") == 0o711 and mode(short_tmp / "state" / "guests") == 0o711
    assert f"fix: chmod o+x {short_tmp}" in caplog.text


def test_what_up_opened_to_its_domains_is_closed_without_a_word(
        short_tmp: Path, caplog: pytest.LogCaptureFixture) -> None:
    """`up` lets its encryption domains through STATE/disks (group x) while it runs; the
    next start takes that away again without saying so every time, and still says so
    for anything else."""
    caplog.set_level(logging.INFO)
    config = load_config(setup(short_tmp))
    disks = short_tmp / "state" / "disks"
    os.chmod(disks, 0o710)
    secure_state_dir(config)
    assert mode(disks) == 0o700 and "tightened" not in caplog.text
    os.chmod(disks, 0o750)
    secure_state_dir(config)
    assert mode(disks) == 0o700 and f"tightened {disks} to mode 700" in caplog.text


@pytest.mark.parametrize("case", ["state-writable", "parent-writable", "parent-owner",
                                  "state-owner"])
def test_unsafe_state_dirs_are_refused_with_the_fix(short_tmp: Path, case: str) -> None:
    config = load_config(setup(short_tmp))
    state = short_tmp / "state"
    if case == "state-writable":
        os.chmod(state, 0o770)
        want = f"state directory {state} is writable by others (mode 770)"
    elif case == "parent-writable":
        os.chmod(short_tmp, 0o777)
        want = f"{short_tmp} is writable by others (mode 777)"
    elif case == "parent-owner":
        os.chown(short_tmp, 4242, -1)
        want = f"{short_tmp} belongs to uid 4242"
    else:
        os.chown(state, 4242, -1)
        want = f"state directory {state} belongs to uid 4242"
    old = os.umask(0o022)
    try:
        with pytest.raises(UnsafePath) as err:
            secure_state_dir(config)
    finally:
        os.umask(old)
        os.chown(short_tmp, 0, -1)
    assert want in str(err.value)


def test_a_sticky_world_writable_parent_is_fine(short_tmp: Path) -> None:
    os.chmod(short_tmp, 0o1777)  # as /tmp: others cannot rename or remove our directory
    config = load_config(setup(short_tmp))
    old = os.umask(0o022)
    try:
        secure_state_dir(config)
    finally:
        os.umask(old)


def test_tls_dir_keys_must_be_private(short_tmp: Path) -> None:
    x509.init_ca(short_tmp / "pki")
    check_tls_dir(short_tmp / "pki", server=True, client=True)
    os.chmod(short_tmp / "pki" / "server-key.pem", 0o644)
    with pytest.raises(TlsSetupError, match="chmod 600"):
        check_tls_dir(short_tmp / "pki", server=True, client=False)
    with pytest.raises(TlsSetupError, match="trustvbd tls init"):
        check_tls_dir(short_tmp / "nothing", server=True, client=False)
