"""Count the access-control domain's runtime code: lines without blanks, comments, docstrings.

    .venv/bin/python scripts/acm_code_size.py -- --policy POLICY_FILE

Starts the real domain (`python -X importtime -m trustvbd.domains.acm ARGS`), waits until it
serves, asks it for its status, stops it, and counts every trustvbd module it imported,
lazy imports while loading the policy included. Also lists the third-party and parser
modules it pulled in (defusedxml, tomllib, xml.*), which the count leaves out.
"""

from __future__ import annotations

import argparse
import ast
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WATCH = ("defusedxml", "tomllib", "xml.", "pyexpat")


def code_lines(source: str) -> int:
    """Lines holding code: not blank, not only a comment, not part of a docstring."""
    docstring_lines: set[int] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                end = body[0].end_lineno or body[0].lineno
                docstring_lines.update(range(body[0].lineno, end + 1))
    lines: set[int] = set()
    skip = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
            tokenize.ENCODING, tokenize.ENDMARKER}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type not in skip:
            lines.update(range(tok.start[0], tok.end[0] + 1))
    return len(lines - docstring_lines)


def imported_modules(domain_args: list[str]) -> list[str]:
    with tempfile.TemporaryDirectory(prefix="acmsz", dir="/tmp") as tmp:
        sock_path = os.path.join(tmp, "s")
        read_end, write_end = os.pipe()
        proc = subprocess.Popen(
            [sys.executable, "-X", "importtime", "-m", "trustvbd.domains.acm", *domain_args,
             "--audit", os.path.join(tmp, "audit.jsonl"), "--socket", sock_path,
             "--ready-fd", str(write_end)],
            pass_fds=(write_end,), stderr=subprocess.PIPE, text=True, cwd=ROOT)
        os.close(write_end)
        with os.fdopen(read_end, "rb") as r:
            started = r.read() == b"ready\n"
        if started:
            try:
                with socket.socket(socket.AF_UNIX) as c:
                    c.settimeout(10)
                    c.connect(sock_path)
                    c.sendall(b'{"op":"status","rid":1}\n')
                    reply = json.loads(c.makefile("rb").readline())
                    print("status:", reply.get("policy", reply), file=sys.stderr)
            finally:
                proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        if not started:
            sys.exit(f"the domain did not start:\n{err}")
    names = []
    for line in err.splitlines():
        if line.startswith("import time:") and "|" in line:
            names.append(line.rsplit("|", 1)[1].strip())
    return names


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("domain_args", nargs="+", help="arguments for the domain after --")
    args = parser.parse_args()
    names = imported_modules(args.domain_args)
    total = 0
    ours = {n for n in names if n == "trustvbd" or n.startswith("trustvbd.")}
    for name in sorted(ours | {"trustvbd.domains.acm"}):  # run as __main__: not in the list
        spec_path = ROOT / (name.replace(".", "/") + ".py")
        if not spec_path.exists():
            spec_path = ROOT / name.replace(".", "/") / "__init__.py"
        n = code_lines(spec_path.read_text(encoding="utf-8"))
        total += n
        print(f"{n:6d}  {name}")
    print(f"{total:6d}  total (trustvbd modules the running domain imported)")
    others = sorted({n for n in names if n.startswith(WATCH) or n in ("pyexpat", "tomllib")})
    print("parsers and third-party modules imported:", ", ".join(others) or "none")


if __name__ == "__main__":
    main()
