"""Telling a storage access refused for want of valid credentials from other failures, in one
line that names no credential (botocore's own messages can carry the key id)."""

from __future__ import annotations

# Error codes S3 and its look-alikes answer a missing, wrong or expired credential with.
AUTH_CODES = ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken",
              "TokenRefreshRequired", "AuthFailure", "UnrecognizedClientException", "403", "Forbidden")
_NO_CREDENTIALS = ("NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError", "NoAuthTokenError")


def auth_failure(e: BaseException, *, remote: bool) -> str | None:
    """Why ``e`` (or an exception it was raised from) is a refusal for want of valid
    credentials (botocore's ``NoCredentialsError``, a 403 ``ClientError``, and on a remote store
    s3fs's ``PermissionError``), as a short phrase; None when it is something else."""
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        name = type(cur).__name__
        code = ""
        response = getattr(cur, "response", None)
        if isinstance(response, dict):
            code = str(response.get("Error", {}).get("Code", ""))
        if name in _NO_CREDENTIALS:
            return "no credentials were found (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or the spec's storage_options)"
        if code in AUTH_CODES or (name == "ClientError" and code.startswith("Expired")):
            return f"access refused ({code}): check the credentials and their permissions"
        if isinstance(cur, PermissionError) and remote:
            return "access refused: check the credentials and their permissions"
        cur = cur.__cause__ or cur.__context__
    return None
