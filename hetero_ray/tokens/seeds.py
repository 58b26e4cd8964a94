"""Seeds derived from names, so that a control's random draws do not depend on processing order."""

from __future__ import annotations

import hashlib


def stable_seed(*parts: object) -> int:
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)
