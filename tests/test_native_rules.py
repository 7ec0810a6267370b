"""Issue #13's rules for the native code that a compiler does not keep by itself.

`#![deny(unsafe_code)]` in lib.rs is only a default: any module can say
`#![allow(unsafe_code)]` and clippy stays quiet. These checks read native/ as a reviewer
would: `unsafe` code in python/foreign.rs only, each block there argued (`// SAFETY:`),
and no native dependency beyond the reviewed ones (cryptography comes from ring alone).
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

NATIVE = Path(__file__).resolve().parents[1] / "native"
UNSAFE_MODULE = NATIVE / "src" / "python" / "foreign.rs"
# Unsafe code, not the word: a block, fn, impl, trait or extern block, or the lint let off.
UNSAFE = re.compile(r"\bunsafe\s*(\{|fn\b|impl\b|trait\b|extern\b)|allow\s*\(\s*unsafe_code")
# Every native dependency is trusted code: reviewed, then named here with why.
REVIEWED = {
    "ring": "AES-256-GCM and HKDF-SHA-256, BoringSSL's constant-time assembly",
    "pyo3": "the bindings",
    "libc": "sendfile(2), used in python/foreign.rs",
    "crc32fast": "the intent log's record CRC-32 (zlib's), no unsafe API used from it",
}


def code(path: Path) -> list[tuple[int, str]]:
    """(line number, line without its // comment) of a Rust file."""
    return [(n, line.split("//", 1)[0]) for n, line in enumerate(path.read_text().splitlines(), 1)]


def test_unsafe_code_is_only_in_the_one_module_that_argues_it() -> None:
    sources = sorted(NATIVE.rglob("*.rs"))
    assert UNSAFE_MODULE in sources
    elsewhere = [f"{path.relative_to(NATIVE)}:{n}: {line.strip()}"
                 for path in sources if path != UNSAFE_MODULE
                 for n, line in code(path) if UNSAFE.search(line)]
    assert not elsewhere, ("unsafe code outside python/foreign.rs (move it there, with a "
                           "`// SAFETY:` argument, or do without it):\n" + "\n".join(elsewhere))
    lib = (NATIVE / "src" / "lib.rs").read_text()
    assert "#![deny(unsafe_code)]" in lib and "#![deny(clippy::undocumented_unsafe_blocks)]" in lib


def test_every_unsafe_block_says_why_it_is_sound() -> None:
    lines = UNSAFE_MODULE.read_text().splitlines()
    blocks = [n for n, line in code(UNSAFE_MODULE) if re.search(r"\bunsafe\s*\{", line)]
    assert blocks, "python/foreign.rs has no unsafe block: drop its allow(unsafe_code)"
    for n in blocks:
        before = n - 2  # the line above the block, 0-based
        while before >= 0 and lines[before].lstrip().startswith("//") \
                and "SAFETY:" not in lines[before]:
            before -= 1
        assert before >= 0 and "// SAFETY:" in lines[before], (
            f"python/foreign.rs:{n}: an unsafe block without a `// SAFETY:` comment right above it")


def test_native_dependencies_are_the_reviewed_ones() -> None:
    manifest = tomllib.loads((NATIVE / "Cargo.toml").read_text())
    deps = set(manifest.get("dependencies", {})) | set(manifest.get("dev-dependencies", {}))
    assert deps == set(REVIEWED), (
        f"native dependencies {sorted(deps)}, reviewed {sorted(REVIEWED)}: a new one is trusted "
        "code (review it, then add it to REVIEWED); cryptography comes from ring only")
    lock = tomllib.loads((NATIVE / "Cargo.lock").read_text())
    crypto = {p["name"] for p in lock["package"]} & {
        "aes", "aes-gcm", "ghash", "sha2", "hkdf", "hmac", "chacha20poly1305", "openssl",
        "openssl-sys", "aws-lc-rs", "aws-lc-sys", "rustls", "boring", "ctr", "cipher"}
    assert not crypto, f"a second cryptography crate in Cargo.lock: {sorted(crypto)}"
