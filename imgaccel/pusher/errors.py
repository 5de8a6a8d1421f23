"""Registry errors: each names the object (registry/repo and digest or tag) and the cause."""


class RegistryError(Exception):
    """A registry request failed for good (after retries where retrying made sense)."""

    def __init__(self, message: str, status: int | None = None, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after  # seconds a 429 (or 503) asked to wait, when it said


class NotFoundError(RegistryError):
    """The registry answered 404 for a manifest or blob."""


class AuthError(RegistryError):
    """Credentials are missing or wrong (401/403)."""


class DigestMismatchError(RegistryError):
    """Bytes received do not hash to the digest they were requested by."""
