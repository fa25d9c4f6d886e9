"""What a URL may carry that is secret (a password, a presigned query's signature), masked wherever
a URL is printed or recorded (log lines, args.yaml, checkpoints). Credentials belong in the
environment, where each storage client looks for them; a URL that held some is recorded without."""
from __future__ import annotations

import re
from os import PathLike
from urllib.parse import urlsplit, urlunsplit

URL = re.compile(r"^[a-z][a-z0-9+.-]*://", re.IGNORECASE)


def masked_url(value: str | PathLike) -> str:
    """`value` with a URL's password and query replaced by ***; anything else (a path) as it is. A
    source list (`A::B`) is masked part by part."""
    value = str(value)
    if "::" in value:
        return "::".join(masked_url(part) for part in value.split("::"))
    if not URL.match(value):
        return value
    parts = urlsplit(value)
    if not parts.password and not parts.query:
        return value
    host = parts.hostname or ""
    netloc = (f"{parts.username}:***@" if parts.password else "") + host + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, "***" if parts.query else "", parts.fragment))
