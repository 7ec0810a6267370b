"""Coverage-guided fuzzing of one target with atheris (libFuzzer): `make fuzz`.

    python -m tests.fuzz.run TARGET [libFuzzer options...]

Starts from the committed corpus (tests/fuzz/corpus/TARGET, read only) and
keeps what it finds in .fuzz/corpus/TARGET; a crash is written to
.fuzz/crashes/. Any exception the target does not document is a crash, and so
is an input that takes more than -timeout seconds or more than -rss_limit_mb.
A crash found becomes a regression input: copy it to the corpus as
`regress-WHAT` once fixed. tests/fuzz/dicts/TARGET.dict, where present, lists
tokens of the format (libFuzzer -dict) so text formats get past their syntax.
Needs the `fuzz` extra (pip install -e '.[fuzz]').
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["trustvbd"]):
    from tests.fuzz.targets import CORPUS, TARGETS, run_one

DICTS = Path(__file__).parent / "dicts"
DEFAULTS = ["-timeout=10", "-rss_limit_mb=2048", "-malloc_limit_mb=512", "-print_final_stats=1"]


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        sys.exit(f"usage: python -m tests.fuzz.run TARGET [libFuzzer options]; TARGET is one of"
                 f" {', '.join(TARGETS)}")
    target = TARGETS[sys.argv[1]]
    work = Path(".fuzz")
    found = work / "corpus" / target.name
    found.mkdir(parents=True, exist_ok=True)
    (work / "crashes").mkdir(parents=True, exist_ok=True)
    args = [sys.argv[0], *DEFAULTS, f"-max_len={target.max_len}",
            f"-artifact_prefix={work / 'crashes'}/{target.name}-", *sys.argv[2:],
            *([f"-dict={DICTS / (target.name + '.dict')}"]
              if (DICTS / (target.name + ".dict")).exists() else []),
            str(found), str(CORPUS / target.name)]
    atheris.Setup(args, lambda data: run_one(target, data))
    atheris.Fuzz()


if __name__ == "__main__":
    main()
