"""A lying driver's integrity events against connect decisions (h2, 2026-12-01), A/B.

    .venv/bin/python bench/integrity_flood.py --baseline DIR [--this DIR] [--seconds 60]
                                              [--reps 2]

Per tree, interleaved: `up` over 3 hostile drivers (tests/hostile_driver.py of this
checkout) of a 32 MiB encrypted disk, one of them dropping 30 % of its writes; fio randrw
4 KiB verify, 3 jobs of 8 MiB each, QD16, for --seconds; nbdinfo connects once a second
meanwhile (each a guest_may_use_disk and Chinese Wall decision). Prints, per run: the
integrity events the encryption domain saw, the integrity records in the audit log and
the events they count, audit records and bytes written, the access-control domain's CPU
seconds and fsyncs (strace -c) and the encryption domain's CPU, and how many connects were
refused. Counts and CPU, no latencies: on a shared machine those say how the cores were
shared. Each tree runs via PYTHONPATH with this checkout's interpreter.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parents[1]
HOSTILE = str(HERE / "tests" / "hostile_driver.py")
PY = sys.executable
SIZE = 32 << 20


def cpu(pid: int) -> float:
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def one(tree: Path, seconds: float) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    phys = int(subprocess.run([PY, "-c", "from trustvbd.crypt.superblock import Layout;"
                               f"print(Layout({SIZE}).physical_size)"], env=env, cwd=tree,
                              capture_output=True, text=True, check=True).stdout)

    def cli(*a: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([PY, "-m", "trustvbd.cli", *a], capture_output=True, text=True,
                              env=env, cwd=tree)

    root = Path(tempfile.mkdtemp(prefix="h2ab", dir="/tmp"))
    procs: list[subprocess.Popen[str]] = []
    up: subprocess.Popen[str] | None = None
    try:
        for i in range(3):
            n = root / f"h{i}"
            p = subprocess.Popen([PY, HOSTILE, "--file", f"{n}.img", "--size", str(phys),
                                  "--socket", f"{n}.sock", "--control", f"{n}.ctl"],
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            procs.append(p)
            assert p.stdout is not None and "ready" in p.stdout.readline()
        drivers = "".join(f'[[driver]]\nname = "h{i}"\nlabel = "S"\n'
                          f'uri = "nbd+unix:///?socket={root / f"h{i}.sock"}"\n' for i in range(3))
        config = root / "c.toml"
        config.write_text(f'state_dir = "state"\n{drivers}[[disk]]\nname = "payroll"\n'
                          f'size = {SIZE}\nlabel = "P"\nreplicas = ["h0", "h1", "h2"]\n'
                          '[[guest]]\nname = "vm1"\nlabel = "P"\n')
        up = subprocess.Popen([PY, "-m", "trustvbd.cli", "up", "-c", str(config)],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                              env=env, cwd=tree)
        assert up.stdout is not None
        uri = ""
        while (line := up.stdout.readline()).strip() != "ready":
            assert line, "up died"
            if line.startswith("guest vm1 disk payroll "):
                uri = line.split()[-1]
        st = json.loads(cli("status", "-c", str(config), "--json").stdout)
        acm = next(d["pid"] for d in st["domains"] if d["kind"] == "acm")
        crypt = next(d["pid"] for d in st["domains"] if d["kind"] == "crypt")
        with socket.socket(socket.AF_UNIX) as c:
            c.connect(str(root / "h2.ctl"))
            c.sendall(b'{"mode": "drop_writes", "rate": 0.3}\n')
            c.recv(16)
        audit = root / "state" / "audit.jsonl"
        size0, n0 = audit.stat().st_size, len(audit.read_bytes().splitlines())
        strace = subprocess.Popen(["strace", "-c", "-f", "-e", "trace=fsync,fdatasync", "-p",
                                   str(acm)], stderr=subprocess.PIPE, text=True)
        time.sleep(0.5)
        acm0, crypt0 = cpu(acm), cpu(crypt)
        fio = subprocess.Popen(
            ["fio", "--name=t", "--ioengine=nbd", f"--uri={uri}", "--rw=randrw", "--bs=4k",
             "--iodepth=16", "--numjobs=3", "--size=8m", "--offset_increment=8m",
             "--serialize_overlap=1", f"--runtime={seconds}", "--time_based", "--verify=crc32c",
             "--verify_state_save=0", "--output-format=json"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        connects, refused = 0, 0
        while fio.poll() is None:
            time.sleep(1)
            r = subprocess.run(["nbdinfo", "--size", uri], capture_output=True, text=True,
                               timeout=60)
            connects += 1
            refused += r.returncode != 0
        out, _ = fio.communicate()
        acm1, crypt1 = cpu(acm), cpu(crypt)
        strace.send_signal(2)
        _, counts = strace.communicate(timeout=30)
        syncs = sum(int(x.split()[3]) for x in counts.splitlines()
                    if x.strip().endswith(("fsync", "fdatasync")) and len(x.split()) >= 5)
        jobs = json.loads(out[out.index("{"):])["jobs"]
        st = json.loads(cli("status", "-c", str(config), "--json").stdout)
        seen = st["disks"][0]["integrity_events"]
        up.terminate()
        up.wait(60)
        recs = [json.loads(x) for x in audit.read_bytes().splitlines()[n0:]]
        integrity = [r["fields"] for r in recs if r["kind"] == "integrity"]
        return {"tree": str(tree), "fio_errors": [j["error"] for j in jobs],
                "fio_ios": sum(j["read"]["total_ios"] + j["write"]["total_ios"] for j in jobs),
                "events_seen": seen, "integrity_records": len(integrity),
                "events_in_records": sum(r.get("events", 1) for r in integrity),
                "audit_records": len(recs), "audit_bytes": audit.stat().st_size - size0,
                "acm_cpu_s": round(acm1 - acm0, 2), "acm_fsyncs": syncs,
                "crypt_cpu_s": round(crypt1 - crypt0, 2), "connects": connects,
                "connects_refused": refused, "load": round(os.getloadavg()[0], 1)}
    finally:
        if up is not None and up.poll() is None:
            up.kill()
            up.wait()
        for p in procs:
            p.kill()
            p.wait()
        shutil.rmtree(root, ignore_errors=True)

def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--baseline", type=Path, required=True)
    parser.add_argument("--this", type=Path, default=HERE)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--reps", type=int, default=2)
    args = parser.parse_args()
    for _ in range(args.reps):
        for tree in (args.baseline.resolve(), args.this.resolve()):
            print(json.dumps(one(tree, args.seconds)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
