"""The base of every error kdcache reports to a user: the CLI prints these as one clear line (exit 2)."""


class KdcacheError(ValueError):
    """Bad input, a damaged or mismatched cache, or a teacher that cannot run; the message says what to do."""
