"""Access control: the sHype/ACM policy model, its Xen XML and TOML forms, decisions, audit log.

Everything here is pure and small on purpose: it is what the access-control
domain (trustvbd/domains/acm.py) runs, and it must be easy to audit.
"""

from __future__ import annotations

from pathlib import Path

from trustvbd.acm.decisions import (
    ChineseWall,
    Decision,
    domain_may_run,
    domains_may_communicate,
    driver_may_serve_disk,
    guest_may_use_disk,
)
from trustvbd.acm.model import INACCESSIBLE, UNLABELED, Policy, PolicyError


def load_policy(path: str | Path) -> Policy:
    """Load and fully validate a policy file: TOML if it ends in .toml, else Xen XML."""
    from trustvbd.acm.toml_loader import load_toml
    from trustvbd.acm.xml_loader import load_xml

    path = Path(path)
    try:
        return load_toml(path) if path.suffix.lower() == ".toml" else load_xml(path)
    except OSError as exc:
        raise PolicyError(str(path), None, f"cannot read: {exc.strerror or exc}") from None


__all__ = [
    "INACCESSIBLE", "UNLABELED", "ChineseWall", "Decision", "Policy", "PolicyError",
    "domain_may_run", "domains_may_communicate", "driver_may_serve_disk", "guest_may_use_disk",
    "load_policy",
]
