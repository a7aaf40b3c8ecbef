"""OAuth 2.0 names the mesh's authorization server and its clients share: grant types, client authentication
methods and the scopes a client may be registered with."""

from __future__ import annotations

from collections.abc import Mapping

from agentvault.common import principal

CLIENT_CREDENTIALS = "client_credentials"
REFRESH_TOKEN = "refresh_token"  # noqa: S105 - a grant type's name
TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"  # noqa: S105 - a grant type's name
GRANT_TYPES = (CLIENT_CREDENTIALS, REFRESH_TOKEN, TOKEN_EXCHANGE)

SECRET_BASIC = "client_secret_basic"  # noqa: S105 - a method's name
SECRET_POST = "client_secret_post"  # noqa: S105 - a method's name
PRIVATE_KEY_JWT = "private_key_jwt"
AUTH_METHODS = (SECRET_BASIC, SECRET_POST, PRIVATE_KEY_JWT)

# The scopes a client may be registered with (and so the most any of its tokens can carry).
KNOWN_SCOPES = (
    principal.ADMIN_SCOPE,
    principal.AGENTS_READ,
    principal.AGENTS_WRITE,
    principal.AGENTS_CONNECT,
    principal.FEDERATION_ADMIN,
    principal.FEDERATION_RESOLVE,
    principal.HEALTH_REPORT,
    principal.MESSAGES_SEND,
    principal.POLICIES_ADMIN,
    principal.POLICIES_READ,
    principal.POLICIES_ENFORCE,
    principal.TOOLS_INVOKE,
    principal.TOOLS_SYNC,
)

# Bounds of a client's registration.
MAX_CLIENT_NAME = 128
MAX_JWKS_BYTES = 8192


class OAuthError(Exception):
    """An RFC 6749 5.2 error: the error code, a description safe to show, the HTTP status and extra headers."""

    def __init__(self, error: str, description: str, status: int = 400, headers: Mapping[str, str] | None = None):
        super().__init__(description)
        self.error = error
        self.description = description
        self.status = status
        self.headers = dict(headers or {})
