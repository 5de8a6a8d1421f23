"""Registry errors: each names the object (registry/repo and digest or tag) and the cause."""


class RegistryError(Exception):
    """A registry request failed for good (after retries where retrying made sense)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class NotFoundError(RegistryError):
    """The registry answered 404 for a manifest or blob."""


class AuthError(RegistryError):
    """Credentials are missing or wrong (401/403)."""


class DigestMismatchError(RegistryError):
    """Bytes received do not hash to the digest they were requested by."""
