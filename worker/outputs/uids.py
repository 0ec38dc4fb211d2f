"""Deterministic UIDs for the objects ct-triage writes back.

A retry of the same result version must send byte-identical objects, so every UID we
mint is a pure function of its inputs: typically (source series UID, result version,
role, index). The UID is in the ``2.25`` arc (ITU-T X.667 / PS3.5 B.2: a UUID as a
decimal integer); the UUID is name-based (SHA-1, RFC 4122 version 5) on the parts, so no registered root is
needed and different inputs collide only with negligible probability.
"""

from __future__ import annotations

import uuid

from pydicom.uid import UID

#: Name-based UUID namespace (uuid5 of a URL we own the name of) so our UIDs never
#: coincide with another application's hash of the same parts.
NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:ct-triage:outputs:v1")


def derived_uid(*parts: str | int) -> UID:
    """A deterministic ``2.25.<n>`` UID from ``parts``.

    ``parts`` are strings (or ints, converted with ``str``), e.g.
    ``derived_uid(source_series_uid, "3", "sc-instance", "12")``. Same parts, same UID;
    the order matters. At most 44 characters (``2.25.`` + 39 digits).

    Raises:
        ValueError: no parts, or an empty part (``parts`` named in the message).
        TypeError: a part that is neither ``str`` nor ``int``.
    """
    if not parts:
        raise ValueError("derived_uid: argument 'parts' must contain at least one value")
    clean: list[str] = []
    for i, part in enumerate(parts):
        if isinstance(part, bool) or not isinstance(part, (str, int)):
            raise TypeError(f"derived_uid: argument 'parts'[{i}] must be str or int, got {type(part).__name__}")
        text = str(part)
        if not text:
            raise ValueError(f"derived_uid: argument 'parts'[{i}] must not be empty")
        clean.append(text)
    # Length-prefix each part so ("ab", "c") and ("a", "bc") differ. Note that
    # pydicom's generate_uid(prefix=None) ignores entropy_srcs (random UUID), hence
    # the explicit name-based UUID (RFC 4122 version 5) here.
    name = "|".join(f"{len(p)}:{p}" for p in clean)
    return UID(f"2.25.{uuid.uuid5(NAMESPACE, name).int}")


def output_uid(source_series_uid: str, result_version: int, role: str, index: int = 0) -> UID:
    """UID for output object ``role`` number ``index`` of a result version.

    Roles used: ``sc-series``, ``sc-instance``, ``sr-series``, ``sr-instance``.
    """
    if not isinstance(source_series_uid, str) or not source_series_uid:
        raise ValueError("output_uid: argument 'source_series_uid' must be a non-empty UID string")
    if isinstance(result_version, bool) or not isinstance(result_version, int) or result_version < 1:
        raise ValueError(f"output_uid: argument 'result_version' must be an int >= 1, got {result_version!r}")
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise ValueError(f"output_uid: argument 'index' must be an int >= 0, got {index!r}")
    return derived_uid(source_series_uid, str(result_version), role, str(index))
