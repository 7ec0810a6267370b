"""Config validation: every mistake names the file, the key and what to do."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from trustvbd.config import ConfigError, format_size, parse_size
from trustvbd.config_file import load_config

GOOD = """
state_dir = "state"
[tls]
dir = "pki"
[[driver]]
name = "drv-a"
label = "StorageA"
dir = "backing/a"
[[disk]]
name = "payroll"
size = "256MiB"
label = "PayrollData"
replicas = ["drv-a"]
[[guest]]
name = "vm1"
label = "Payroll"
listen = "127.0.0.1:0"
"""


def write(tmp: Path, text: str) -> Path:
    path = tmp / "c.toml"
    path.write_text(text)
    return path


def error_of(tmp: Path, text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp, text))
    return info.value


def test_good_config_resolves_paths_relative_to_file(short_tmp: Path) -> None:
    config = load_config(write(short_tmp, GOOD))
    assert config.state_dir == short_tmp / "state"
    assert config.drivers["drv-a"].dir == short_tmp / "backing" / "a"
    assert config.disks["payroll"].size == 256 * 1024 * 1024
    assert config.disks["payroll"].encrypt is True
    assert config.guests["vm1"].listen == ("127.0.0.1", 0)
    assert config.guests["vm1"].tls and config.guests["vm1"].certificate_name == "vm1"
    assert config.tls_dir == short_tmp / "pki"
    assert config.limits.handshake_timeout == 30 and config.limits.idle_timeout == 3600
    assert config.limits.leaf_cache == 16 << 20  # 4096 leaf pages per encrypted disk
    config = load_config(write(short_tmp, GOOD.replace('state_dir = "state"\n',
                                                       'state_dir = "state"\n[limits]\nleaf_cache = "1MiB"\n')))
    assert config.limits.leaf_cache == 1 << 20
    assert config.limits.connections == 64
    assert config.guest_socket("vm1") == short_tmp / "state" / "guests" / "vm1.sock"
    assert config.policy is None
    assert config.drivers["drv-a"].user is None  # as root: a dynamic uid of its own
    config = load_config(write(short_tmp, GOOD.replace('dir = "backing/a"', 'dir = "b"\nuser = "nobody"')))
    assert config.drivers["drv-a"].user == "nobody"


@pytest.mark.parametrize(
    ("text", "size"),
    [("4096", 4096), ("4KiB", 4096), ("1MiB", 1 << 20), ("1M", 1 << 20), ("2GiB", 2 << 30),
     ("1MB", 1_000_000), ("8 kib", 8192), (12288, 12288)],
)
def test_parse_size(text: str | int, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "abc", "1.5GiB", "-4096", "12 parsecs", True])
def test_parse_size_rejects(text: object) -> None:
    with pytest.raises(ValueError):
        parse_size(text)  # type: ignore[arg-type]


def test_parse_size_suffixes_are_case_insensitive_as_documented() -> None:
    assert parse_size("64mib") == parse_size("64MiB") == 64 << 20
    assert parse_size("64mb") == 64_000_000 and parse_size("1g") == 1 << 30


def test_format_size() -> None:
    assert format_size(256 << 20) == "256MiB"
    assert format_size(4096 * 3) == "12KiB"
    assert format_size(1000) == "1000B"


@pytest.mark.parametrize(
    ("mutation", "key", "words"),
    [
        (("state_dir = \"state\"", "state_dir = \"state\"\ncolour = \"blue\""), "colour", "unknown key"),
        (("state_dir = \"state\"\n", ""), "state_dir", "missing"),
        (("size = \"256MiB\"", "size = \"256 furlongs\""), "disk[0].size", "cannot read size"),
        (("size = \"256MiB\"", "size = \"5000\""), "disk[0].size", "multiple of 4 KiB"),
        (("replicas = [\"drv-a\"]", "replicas = [\"drv-z\"]"), "disk[0].replicas", "unknown driver 'drv-z'"),
        (("replicas = [\"drv-a\"]", "replicas = []"), "disk[0].replicas", "empty"),
        (("label = \"Payroll\"\n", ""), "guest[0].label", "missing"),
        (("name = \"vm1\"", "name = \"vm 1\""), "guest[0].name", "not a valid name"),
        (("dir = \"backing/a\"", "dir = \"backing/a\"\nuri = \"nbd://127.0.0.1/x\""), "driver[0].dir",
         "exactly one of dir"),
        (("dir = \"backing/a\"", "uri = \"http://example/x\""), "driver[0].uri", "nbd"),
        (("listen = \"127.0.0.1:0\"", "listen = \"localhost\""), "guest[0].listen", "HOST:PORT"),
        (("name = \"vm1\"", "name = \"payroll\""), "guest 'payroll'", "also used by a disk"),
        (("[[guest]]", "[guest]"), "guest", "array of tables"),
        (("state_dir = \"state\"\n[tls]\ndir = \"pki\"\n", "state_dir = \"state\"\ntls = 3\n"), "tls",
         "found 3, where a table is expected: write a [tls] section with its keys"),
        (("[tls]\ndir = \"pki\"\n", ""), "guest[0].listen", "needs TLS"),
        (("listen = \"127.0.0.1:0\"", "tls = false"), "guest[0].tls", "TCP port only"),
        (("label = \"Payroll\"\n", "label = \"Payroll\"\nuser = \"no-such-user-x\"\n"),
         "guest[0].user", "no user named"),
        (("label = \"Payroll\"\n", "label = \"Payroll\"\ntls_name = \"\"\n"),
         "guest[0].tls_name", "empty"),
        (("dir = \"pki\"", "dir = \"pki\"\nfiles = 1"), "tls.files", "unknown key"),
        (("state_dir = \"state\"\n", "state_dir = \"state\"\n[limits]\nidle_timeout = -1\n"),
         "limits.idle_timeout", "seconds"),
        (("state_dir = \"state\"\n", "state_dir = \"state\"\n[limits]\nleaf_cache = \"64KiB\"\n"),
         "limits.leaf_cache", "too small; give at least 256KiB"),
        (("state_dir = \"state\"\n", "state_dir = \"state\"\n[limits]\nconnections = 0\n"),
         "limits.connections", "whole number between 1 and 1024, not 0"),
        (("state_dir = \"state\"\n", "state_dir = \"state\"\n[limits]\nconnections = 2.5\n"),
         "limits.connections", "whole number between 1 and 1024, not 2.5"),
        (("size = \"256MiB\"", "size = \"256MiB\"\nencrypt = \"yes\""), "disk[0].encrypt", "true or false"),
        (("dir = \"backing/a\"", "uri = \"nbd://127.0.0.1/x\"\nuser = \"nobody\""), "driver[0].user",
         "runs as whoever started it"),
        (("dir = \"backing/a\"", "dir = \"backing/a\"\nuser = \"\""), "driver[0].user", "is empty"),
        # Found by trying: each of these used to pass the check and end in a traceback or
        # a misleading line once domains had started.
        (("dir = \"backing/a\"", "dir = \"backing/a\"\nuser = \"no-such-user-x\""),
         "driver[0].user", "no user named 'no-such-user-x' on this system; create it, or remove"),
        (("dir = \"backing/a\"", "dir = \"backing/a\"\nuser = \"root\""), "driver[0].user",
         "needs an unprivileged user"),
        (("size = \"256MiB\"", "size = \"9000000TiB\""), "disk[0].size",
         "past the 9223372036854775807 a file or an NBD export can address"),
        (("size = \"256MiB\"", "size = \"8388608TiB\"\nencrypt = false"), "disk[0].size",
         "give a smaller size"),
        (("state_dir = \"state\"\n[tls]\ndir = \"pki\"\n", "[tls]\ndir = \"pki\"\nstate_dir = \"state\"\n"),
         "tls.state_dir", "is inside [tls]: in TOML every key after a [section] line belongs to it"),
        # Found by the red team (h5): a NUL in a path ended in a ValueError traceback; an
        # empty label started every domain, then stopped on "policy forbids driver ...".
        (("state_dir = \"state\"", "state_dir = \"st\\u0000ate\""), "state_dir", "NUL character"),
        (("dir = \"backing/a\"", "dir = \"backing\\u0000/a\""), "driver[0].dir", "NUL character"),
        (("dir = \"pki\"", "dir = \"p\\u0000ki\""), "tls.dir", "NUL character"),
        (("label = \"StorageA\"", "label = \"\""), "driver[0].label", "is empty: give a label"),
        (("label = \"PayrollData\"", "label = \"\""), "disk[0].label", "is empty: give a label"),
        (("label = \"Payroll\"\n", "label = \"\"\n"), "guest[0].label", "is empty: give a label"),
        (("label = \"Payroll\"\n", "label = \"Pay\\nroll\"\n"), "guest[0].label",
         "holds a control character"),
        (("label = \"PayrollData\"", f"label = \"{'P' * 257}\""), "disk[0].label",
         "too long: give a label of 1 to 256 characters"),
        # Found by the attack campaign (h4): a replica that is no string (a list, a table)
        # ended in a TypeError traceback ("unhashable type") from `up` and every command.
        (("replicas = [\"drv-a\"]", "replicas = [[\"drv-a\"]]"), "disk[0].replicas",
         "must name drivers as strings, not ['drv-a']"),
        (("replicas = [\"drv-a\"]", "replicas = [\"drv-a\", {a = 1}]"), "disk[0].replicas",
         "must name drivers as strings, not {'a': 1}"),
    ],
)
def test_mistakes_name_file_key_and_fix(short_tmp: Path, mutation: tuple[str, str], key: str,
                                        words: str) -> None:
    old, new = mutation
    assert old in GOOD
    err = error_of(short_tmp, GOOD.replace(old, new, 1))
    assert err.file == str(short_tmp / "c.toml")
    assert err.key == key
    assert words in err.message
    assert str(short_tmp / "c.toml") in str(err)


def test_duplicate_names(short_tmp: Path) -> None:
    text = GOOD + '[[guest]]\nname = "vm1"\nlabel = "X"\n'
    err = error_of(short_tmp, text)
    assert err.key == "guest[1].name"
    assert "duplicate guest name 'vm1'" in err.message


def test_uri_driver_serves_one_disk(short_tmp: Path) -> None:
    text = GOOD.replace('dir = "backing/a"', 'uri = "nbd+unix:///x?socket=/tmp/x.sock"')
    text += '[[disk]]\nname = "other"\nsize = "1MiB"\nlabel = "L"\nreplicas = ["drv-a"]\n'
    err = error_of(short_tmp, text)
    assert "single NBD export" in err.message


def test_not_toml(short_tmp: Path) -> None:
    err = error_of(short_tmp, "state_dir = \n")
    assert "not valid TOML" in err.message


def test_missing_file(short_tmp: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_config(short_tmp / "nope.toml")


@pytest.mark.parametrize(("make", "said"), [
    (lambda p: p.mkdir(), "is a directory; pass the config file with -c PATH"),
    (lambda p: p.write_bytes(b"\xff\xfe state_dir"), "not UTF-8 text (invalid start byte at"
                                                      " byte 0); a config is a TOML file"),
])
def test_a_config_that_is_no_file_or_no_text_is_said_without_errno(
        short_tmp: Path, make: Any, said: str) -> None:
    """Was "cannot read: [Errno 21] Is a directory: '/path'" (Python's raw text)."""
    make(short_tmp / "c.toml")
    with pytest.raises(ConfigError) as err:
        load_config(short_tmp / "c.toml")
    assert err.value.message == said
    assert "Errno" not in str(err.value)


def test_a_config_that_is_a_fifo_or_a_device_is_refused_at_once(short_tmp: Path) -> None:
    """`-c FIFO` held `up` and every command in open() for good; `-c /dev/zero` read on until
    memory ran out. Only a regular file is read, at most 4 MiB of it."""
    import subprocess

    from tests.support import TRUSTVBD

    fifo = short_tmp / "fifo"
    os.mkfifo(fifo)
    big = short_tmp / "big.toml"
    big.write_bytes(b"#" * ((4 << 20) + 1))
    for path, said in ((fifo, "not a regular file (a config is one); pass the config file with"
                        " -c PATH"), (Path("/dev/zero"), "not a regular file (a config is one);"
                                      " pass the config file with -c PATH"),
                       (big, "larger than 4 MiB, so no config; pass the config file with -c"
                        " PATH")):
        with pytest.raises(ConfigError) as err:
            load_config(path)
        assert err.value.message == said
        out = subprocess.run([*TRUSTVBD, "status", "-c", str(path)], capture_output=True,
                             text=True, timeout=30)
        assert out.returncode != 0
        assert out.stderr == f"trustvbd: config error: {path}: {said}\n"


def test_a_config_nested_too_deeply_is_one_line_not_a_recursion_error(short_tmp: Path) -> None:
    (short_tmp / "c.toml").write_text('state_dir = "s"\nx = ' + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(ConfigError, match="not valid TOML: arrays or tables nested too deeply"):
        load_config(short_tmp / "c.toml")


def test_unreadable_policy(short_tmp: Path) -> None:
    err = error_of(short_tmp, 'policy = "missing.xml"\n' + GOOD)
    assert err.key == "policy"
    assert "cannot read" in err.message


def test_socket_path_too_long(short_tmp: Path) -> None:
    long_dir = "s" * 90
    err = error_of(short_tmp, GOOD.replace('state_dir = "state"', f'state_dir = "{long_dir}"'))
    assert err.key == "state_dir"
    assert "over the Unix limit of 107" in err.message


def _drivers(n: int) -> str:
    return "".join(f'[[driver]]\nname = "m{i}"\nlabel = "S"\ndir = "m{i}"\n' for i in range(n))


def test_mirroring_lists_one_to_eight_replicas(short_tmp: Path) -> None:
    names = ", ".join(f'"m{i}"' for i in range(8))
    text = GOOD.replace('replicas = ["drv-a"]', f"replicas = [{names}]") + _drivers(9)
    assert load_config(write(short_tmp, text)).disks["payroll"].replicas == tuple(f"m{i}" for i in range(8))
    nine = ", ".join(f'"m{i}"' for i in range(9))
    err = error_of(short_tmp, GOOD.replace('replicas = ["drv-a"]', f"replicas = [{nine}]") + _drivers(9))
    assert err.key == "disk[0].replicas" and "at most 8" in err.message


def test_mirroring_needs_encryption(short_tmp: Path) -> None:
    text = GOOD.replace('replicas = ["drv-a"]', 'replicas = ["m0", "m1"]\nencrypt = false') + _drivers(2)
    err = error_of(short_tmp, text)
    assert err.key == "disk[0].replicas" and "encrypt = true" in err.message


def test_tls_opt_out_name_and_user(short_tmp: Path) -> None:
    text = GOOD.replace("[tls]\ndir = \"pki\"\n", "").replace(
        "listen = \"127.0.0.1:0\"", "listen = \"127.0.0.1:0\"\ntls = false\nuser = 0")
    guest = load_config(write(short_tmp, text)).guests["vm1"]
    assert guest.tls is False and guest.uid == 0 and load_config(write(short_tmp, text)).tls_dir is None
    named = load_config(write(short_tmp, GOOD.replace(
        "listen = \"127.0.0.1:0\"", "listen = \"127.0.0.1:0\"\ntls_name = \"vm1.example\"\nuser = \"root\"")))
    assert named.guests["vm1"].certificate_name == "vm1.example" and named.guests["vm1"].uid == 0


def test_tls_driver_uri_needs_the_tls_dir(short_tmp: Path) -> None:
    text = GOOD.replace("dir = \"backing/a\"", "uri = \"nbds://127.0.0.1:9/x\"")
    assert load_config(write(short_tmp, text)).drivers["drv-a"].uri == "nbds://127.0.0.1:9/x"
    err = error_of(short_tmp, text.replace("[tls]\ndir = \"pki\"\n", "").replace(
        "listen = \"127.0.0.1:0\"", ""))
    assert err.key == "driver[0].uri" and "[tls]" in err.message


@pytest.mark.parametrize("first, second", [
    ('dir = "backing/b"', 'dir = "backing/./b"'),  # one directory, written differently
    ('uri = "nbd+unix:///e?socket=/tmp/x/y.sock"', 'uri = "nbd+unix:///e?socket=/tmp/x//y.sock"'),
    ('uri = "nbd://localhost:10809/e"', 'uri = "nbds://LOCALHOST/e"'),  # TLS or not: one export
    ('dir = "backing/b"', 'uri = "nbd+unix:///payroll?socket=TMP/state/drivers/m0.sock"'),
])
def test_two_drivers_on_one_backing_are_refused_in_one_line(short_tmp: Path, first: str,
                                                            second: str) -> None:
    """A mirror whose two replicas are one backing (one directory, one NBD export, or a
    URI naming the socket `up` serves our own driver on) holds one copy, counting two."""
    text = GOOD.replace('replicas = ["drv-a"]', 'replicas = ["m0", "m1"]')
    for name, line in (("m0", first), ("m1", second)):
        text += f'[[driver]]\nname = "{name}"\nlabel = "S"\n{line.replace("TMP", str(short_tmp))}\n'
    err = error_of(short_tmp, text)
    assert err.key == f"driver[2].{second.split()[0]}" and "\n" not in str(err)
    assert "also the backing of driver 'm0'" in err.message and "give each its own" in err.message


def test_drivers_on_different_backings_pass(short_tmp: Path) -> None:
    text = GOOD.replace('replicas = ["drv-a"]', 'replicas = ["drv-a", "m0", "m1"]')
    text += ('[[driver]]\nname = "m0"\nlabel = "S"\nuri = "nbd+unix:///e?socket=/tmp/x.sock"\n'
             '[[driver]]\nname = "m1"\nlabel = "S"\nuri = "nbd+unix:///f?socket=/tmp/x.sock"\n')
    assert len(load_config(write(short_tmp, text)).disks["payroll"].replicas) == 3


def test_an_entry_of_a_table_array_that_is_no_table_says_what_to_write(short_tmp: Path) -> None:
    err = error_of(short_tmp, 'state_dir = "state"\ndriver = [3]\n')
    assert (err.key, err.message) == (
        "driver[0]", "found 3, where a table is expected: write a [[driver]] section with its keys")


PLACED = GOOD.replace('state_dir = "state"\n', 'state_dir = "state"\n[placement]\ncpus = [0]\n')


def test_placement_cpus_go_to_each_disk_without_its_own(short_tmp: Path) -> None:
    """[placement] cpus is every disk's; a disk's own `cpus` wins; a domain or driver serving
    several disks may run on all their CPUs, and on any once one of them is not placed."""
    config = load_config(write(short_tmp, GOOD))
    assert config.cpus is None and config.disk_cpus(["payroll"]) is None
    config = load_config(write(short_tmp, PLACED))
    assert config.cpus == {0} and config.disks["payroll"].cpus is None
    assert config.disk_cpus(["payroll"]) == {0} and config.disk_cpus([]) == {0}
    two = GOOD.replace('replicas = ["drv-a"]\n', 'replicas = ["drv-a"]\ncpus = [1]\n[[disk]]\n'
                       'name = "bank"\nsize = "4MiB"\nlabel = "BankData"\nreplicas = ["drv-a"]\n')
    config = load_config(write(short_tmp, two))
    assert config.disk_cpus(["payroll"]) == {1} and config.disk_cpus(["payroll", "bank"]) is None
    config = load_config(write(short_tmp, two.replace('state_dir = "state"\n',
                                                      'state_dir = "state"\n[placement]\ncpus = [0]\n')))
    assert config.disk_cpus(["bank"]) == {0} and config.disk_cpus(["payroll", "bank"]) == {0, 1}


@pytest.mark.parametrize(("cpus", "words"), [
    ("[]", "must be a non-empty list of CPU numbers like [0] or [0, 1], not []"),
    ("[\"0\"]", "not ['0']"),
    ("[-1]", "not [-1]"),
    ("[true]", "not [True]"),
    ("0", "must be a list, not 0"),
    ("[0, 0]", "names a CPU twice"),
    ("[4096]", "CPU 4096 does not exist on this machine (it has"),
])
def test_placement_mistakes_name_the_key_and_what_to_do(short_tmp: Path, cpus: str,
                                                         words: str) -> None:
    err = error_of(short_tmp, PLACED.replace("cpus = [0]", f"cpus = {cpus}"))
    assert err.key == "placement.cpus" and words in err.message, err
    err = error_of(short_tmp, GOOD.replace('replicas = ["drv-a"]\n',
                                           f'replicas = ["drv-a"]\ncpus = {cpus}\n'))
    assert err.key == "disk[0].cpus" and words in err.message, err
    assert "unknown key" in error_of(short_tmp, PLACED.replace("cpus", "cpu")).message


def test_a_cpu_present_but_not_allowed_to_trustvbd_is_refused(short_tmp: Path) -> None:
    """A CPU outside what trustvbd may use (taskset, a cpuset) is refused at load, with the
    CPUs it may use: the domain would otherwise fail in its fork, after others started."""
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs two CPUs")
    first, other = sorted(os.sched_getaffinity(0))[:2]
    path = write(short_tmp, PLACED.replace("cpus = [0]", f"cpus = [{other}]"))
    out = subprocess.run(["taskset", "-c", str(first), sys.executable, "-c",
                          "import sys\nfrom trustvbd.config import ConfigError\n"
                          "from trustvbd.config_file import load_config\n"
                          "try:\n    load_config(sys.argv[1])\nexcept ConfigError as e:\n"
                          "    print(e)\n", str(path)], capture_output=True, text=True, check=True)
    assert (f"placement.cpus: CPU {other} is not one trustvbd may run on here (allowed: {first};"
            in out.stdout), out
    assert load_config(path).cpus == {other}  # without taskset: allowed
