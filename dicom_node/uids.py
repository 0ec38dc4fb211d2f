"""UID validation and UID-to-path mapping: no path is ever built from a raw UID."""

from __future__ import annotations

import hashlib
import re

_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


def is_valid_uid(value: object) -> bool:
    """PS3.5 9.1: digits and dots, no leading zeros in a component, at most 64 chars."""
    return isinstance(value, str) and 0 < len(value) <= 64 and _UID_RE.match(value) is not None


# 256 folders of instances, named by the first two hex digits of the hash: created (and
# made durable) once at start-up, so storing an instance never creates a folder and
# costs one directory fsync (dicom_node.spool). ext4 indexes large folders (htree).
INSTANCE_FOLDERS = [f"instances/{i:02x}" for i in range(256)]


def instance_relpath(sop_instance_uid: str) -> str:
    """Storage path of an instance, from a hash of its (validated) UID."""
    if not is_valid_uid(sop_instance_uid):
        raise ValueError(f"sop_instance_uid is not a valid UID: {sop_instance_uid!r}")
    digest = hashlib.sha256(sop_instance_uid.encode("ascii")).hexdigest()
    return f"instances/{digest[:2]}/{digest}.dcm"
