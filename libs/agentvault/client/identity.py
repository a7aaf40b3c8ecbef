"""IdentityClient: a typed asyncio client for a registry's OAuth client management (IdentityService)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

from agentvault.client.base import GrpcClient, pages
from agentvault.identity.v1 import identity_service_pb2 as ipb
from agentvault.identity.v1 import identity_service_pb2_grpc as ipb_grpc

SERVICE = ipb.DESCRIPTOR.services_by_name["IdentityService"].full_name
IDEMPOTENT_METHODS = ("ListOAuthClients", "GetOAuthClient", "GetJwks", "GetServerMetadata")


class IdentityClient(GrpcClient):
    """Registers and manages the OAuth 2.0 clients of a mesh; every management call needs an admin credential.

    The registry serves this API: address default $REGISTRY_ADDR, else 127.0.0.1:$REGISTRY_PORT; the other
    options are GrpcClient's (token, timeout, root_certificates, tls, retry, options)."""

    SERVICE_LABEL = "registry"
    ADDRESS_ENV, PORT_ENV = "REGISTRY_ADDR", "REGISTRY_PORT"
    IDEMPOTENT = tuple((SERVICE, m) for m in IDEMPOTENT_METHODS)

    @property
    def _stub(self) -> ipb_grpc.IdentityServiceAsyncStub:
        return self._stub_of(ipb_grpc.IdentityServiceStub)

    async def create_client(
        self,
        name: str,
        scopes: Sequence[str],
        *,
        grant_types: Sequence[str] = (),
        agent_id: str = "",
        jwks: str = "",
        token_endpoint_auth_method: str = "",
        timeout: float | None = None,
    ) -> ipb.CreateOAuthClientResponse:
        """Registers a client; the response's `client_secret` is shown this once. Never retried."""
        request = ipb.CreateOAuthClientRequest(
            name=name,
            scopes=list(scopes),
            grant_types=list(grant_types),
            agent_id=agent_id,
            jwks=jwks,
            token_endpoint_auth_method=token_endpoint_auth_method,
        )
        return await self._call(self._stub.CreateOAuthClient, request, timeout)

    async def list_clients(
        self, *, page_size: int = 0, page_token: str = "", timeout: float | None = None
    ) -> ipb.ListOAuthClientsResponse:
        request = ipb.ListOAuthClientsRequest(page_size=page_size, page_token=page_token)
        return await self._call(self._stub.ListOAuthClients, request, timeout)

    async def iter_clients(self, *, page_size: int = 0, timeout: float | None = None) -> AsyncIterator[ipb.OAuthClient]:
        async for page in pages(
            lambda token: self.list_clients(page_size=page_size, page_token=token, timeout=timeout)
        ):
            for client in page.clients:
                yield client

    async def get_client(self, client_id: str, *, timeout: float | None = None) -> ipb.OAuthClient:
        return await self._call(self._stub.GetOAuthClient, ipb.GetOAuthClientRequest(client_id=client_id), timeout)

    async def rotate_secret(
        self, client_id: str, *, timeout: float | None = None
    ) -> ipb.RotateOAuthClientSecretResponse:
        """A new secret, shown this once; the old one stops working at once."""
        request = ipb.RotateOAuthClientSecretRequest(client_id=client_id)
        return await self._call(self._stub.RotateOAuthClientSecret, request, timeout)

    async def disable_client(self, client_id: str, *, timeout: float | None = None) -> ipb.OAuthClient:
        """Refuses the client's token requests and revokes its refresh tokens and live access tokens."""
        request = ipb.DisableOAuthClientRequest(client_id=client_id)
        return await self._call(self._stub.DisableOAuthClient, request, timeout)

    async def enable_client(self, client_id: str, *, timeout: float | None = None) -> ipb.OAuthClient:
        request = ipb.EnableOAuthClientRequest(client_id=client_id)
        return await self._call(self._stub.EnableOAuthClient, request, timeout)

    async def delete_client(self, client_id: str, *, timeout: float | None = None) -> None:
        await self._call(self._stub.DeleteOAuthClient, ipb.DeleteOAuthClientRequest(client_id=client_id), timeout)
