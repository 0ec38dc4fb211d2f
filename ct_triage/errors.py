"""One base exception for ct-triage and the few kinds callers tell apart."""


class CtTriageError(Exception):
    """Base class of every error ct-triage raises on purpose."""


class ConfigError(CtTriageError):
    """A setting is missing or malformed; the message names the variable."""


class InvalidInput(CtTriageError):
    """Input data (a DICOM object, a UID, a file) cannot be used; message says why."""


class NotApplicable(CtTriageError):
    """The study or series is not something ct-triage scores (reason in the message)."""


class TransientError(CtTriageError):
    """A failure worth retrying (peer down, timeout, busy)."""


class PermanentError(CtTriageError):
    """A failure that retrying will not fix (rejected, unknown AE, bad object)."""
