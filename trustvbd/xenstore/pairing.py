"""Which writes pair a frontend directory with a backend directory (Xen's device layout).

A disk attachment has a frontend directory in the guest's home,
`/local/domain/<fe>/device/<type>/<n>`, and a backend directory in the serving
domain's home, `/local/domain/<be>/backend/<type>/<fe>/<n>`. Writing the frontend's
`backend` key (or the backend's `frontend` key) points one at the other: that write
is the pairing, and the store lets the access-control domain decide it (check (a)).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from trustvbd.xenstore.wire import XsError

_FRONTEND = re.compile(r"/local/domain/(\d+)/device/([A-Za-z0-9_-]+)/(\d+)")
_BACKEND = re.compile(r"/local/domain/(\d+)/backend/([A-Za-z0-9_-]+)/(\d+)/(\d+)")


@dataclass(frozen=True)
class Pairing:
    frontend_domid: int
    backend_domid: int
    frontend_dir: str
    backend_dir: str


def frontend_dir(fe: int, kind: str, devid: int) -> str:
    return f"/local/domain/{fe}/device/{kind}/{devid}"


def backend_dir(be: int, kind: str, fe: int, devid: int) -> str:
    return f"/local/domain/{be}/backend/{kind}/{fe}/{devid}"


def pairing_of(path: str, value: bytes) -> Pairing | None:
    """The pairing a WRITE of `value` at `path` makes, None if the key pairs nothing;
    EINVAL if it is a pairing key whose value is not the matching directory."""
    head, _, key = path.rpartition("/")
    if key == "backend" and (fe := _FRONTEND.fullmatch(head)):
        other = _BACKEND.fullmatch(value.decode("ascii", "replace"))
        if not other or (other[2], other[3], other[4]) != (fe[2], fe[1], fe[3]):
            raise XsError("EINVAL", f"{path} must name /local/domain/<id>/backend/{fe[2]}/{fe[1]}/{fe[3]}")
        return Pairing(int(fe[1]), int(other[1]), head, other[0])
    if key == "frontend" and (be := _BACKEND.fullmatch(head)):
        other = _FRONTEND.fullmatch(value.decode("ascii", "replace"))
        if not other or (other[1], other[2], other[3]) != (be[3], be[2], be[4]):
            raise XsError("EINVAL", f"{path} must name {frontend_dir(int(be[3]), be[2], int(be[4]))}")
        return Pairing(int(be[3]), int(be[1]), other[0], head)
    return None


def pairings_in(keys: Iterable[tuple[str, bytes]]) -> list[Pairing]:
    """Every pairing made by the `backend` and `frontend` keys among (path, value), once
    each, in order; keys whose value pairs nothing (or wrongly) are skipped."""
    found: dict[tuple[str, str], Pairing] = {}
    for path, value in keys:
        if not path.endswith(("/backend", "/frontend")):
            continue
        try:
            pairing = pairing_of(path, value)
        except XsError:
            continue
        if pairing is not None:
            found.setdefault((pairing.frontend_dir, pairing.backend_dir), pairing)
    return list(found.values())
