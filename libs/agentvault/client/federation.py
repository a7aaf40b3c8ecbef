"""FederationClient: a typed asyncio client for a registry's federation admin API (peers and credentials)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

from google.protobuf import field_mask_pb2

from agentvault.client.base import GrpcClient, pages
from agentvault.federation.v1 import federation_service_pb2 as fpb
from agentvault.federation.v1 import federation_service_pb2_grpc as fpb_grpc

SERVICE = fpb.DESCRIPTOR.services_by_name["PeerService"].full_name
IDEMPOTENT_METHODS = ("ListPeers", "GetPeer", "ListFederationCredentials", "ListFederationInvitations")


class FederationClient(GrpcClient):
    """Manages a mesh's peers and the credentials it issues to other meshes; every call needs an admin credential.

    The registry serves this API: address default $REGISTRY_ADDR, else 127.0.0.1:$REGISTRY_PORT; the other
    options are GrpcClient's (token, timeout, root_certificates, tls, retry, options)."""

    SERVICE_LABEL = "registry"
    ADDRESS_ENV, PORT_ENV = "REGISTRY_ADDR", "REGISTRY_PORT"
    IDEMPOTENT = tuple((SERVICE, m) for m in IDEMPOTENT_METHODS)

    @property
    def _stub(self) -> fpb_grpc.PeerServiceAsyncStub:
        return self._stub_of(fpb_grpc.PeerServiceStub)

    # -------------------------------------------------------------------------------------------- peers

    async def create_peer(self, peer: fpb.Peer, *, timeout: float | None = None) -> fpb.Peer:
        """Adds a peer: name, registry_url and api_key (the token the peer issued to this mesh) are required;
        the key is encrypted at rest and never returned. Or name and invitation (a code the peer issued): the
        tokens of both directions are then agreed with the peer. Never retried."""
        return await self._call(self._stub.CreatePeer, fpb.CreatePeerRequest(peer=peer), timeout)

    async def list_peers(
        self, *, page_size: int = 0, page_token: str = "", timeout: float | None = None
    ) -> fpb.ListPeersResponse:
        request = fpb.ListPeersRequest(page_size=page_size, page_token=page_token)
        return await self._call(self._stub.ListPeers, request, timeout)

    async def iter_peers(self, *, page_size: int = 0, timeout: float | None = None) -> AsyncIterator[fpb.Peer]:
        async for page in pages(lambda token: self.list_peers(page_size=page_size, page_token=token, timeout=timeout)):
            for peer in page.peers:
                yield peer

    async def get_peer(self, peer_id: str, *, timeout: float | None = None) -> fpb.Peer:
        return await self._call(self._stub.GetPeer, fpb.GetPeerRequest(peer_id=peer_id), timeout)

    async def update_peer(
        self, peer: fpb.Peer, update_mask: Sequence[str] | None = None, *, timeout: float | None = None
    ) -> fpb.Peer:
        """Changes the fields of `peer` (its id set) named in `update_mask`; None or [] changes every writable
        field set in `peer`."""
        mask = field_mask_pb2.FieldMask(paths=list(update_mask or ()))
        return await self._call(self._stub.UpdatePeer, fpb.UpdatePeerRequest(peer=peer, update_mask=mask), timeout)

    async def delete_peer(self, peer_id: str, *, timeout: float | None = None) -> None:
        """Removes a peer and its cached agents."""
        await self._call(self._stub.DeletePeer, fpb.DeletePeerRequest(peer_id=peer_id), timeout)

    # -------------------------------------------------------------------------------------- credentials

    async def create_credential(
        self, name: str, *, timeout: float | None = None
    ) -> fpb.CreateFederationCredentialResponse:
        """Issues the token the peer mesh `name` presents to this one; the response's `token` is shown this once."""
        request = fpb.CreateFederationCredentialRequest(name=name)
        return await self._call(self._stub.CreateFederationCredential, request, timeout)

    async def list_credentials(
        self, *, page_size: int = 0, page_token: str = "", timeout: float | None = None
    ) -> fpb.ListFederationCredentialsResponse:
        request = fpb.ListFederationCredentialsRequest(page_size=page_size, page_token=page_token)
        return await self._call(self._stub.ListFederationCredentials, request, timeout)

    async def iter_credentials(
        self, *, page_size: int = 0, timeout: float | None = None
    ) -> AsyncIterator[fpb.FederationCredential]:
        async for page in pages(
            lambda token: self.list_credentials(page_size=page_size, page_token=token, timeout=timeout)
        ):
            for credential in page.credentials:
                yield credential

    async def revoke_credential(self, id: str, *, timeout: float | None = None) -> fpb.FederationCredential:
        """Revokes a credential at once, on every replica."""
        request = fpb.RevokeFederationCredentialRequest(id=id)
        return await self._call(self._stub.RevokeFederationCredential, request, timeout)

    # -------------------------------------------------------------------------------------- invitations

    async def create_invitation(
        self, name: str, *, ttl_seconds: int = 0, timeout: float | None = None
    ) -> fpb.CreateFederationInvitationResponse:
        """A one-time invitation for the peer mesh `name`; the response's `code` is shown this once. The peer's
        admin redeems it with create_peer(Peer(name=..., invitation=code)). Never retried."""
        request = fpb.CreateFederationInvitationRequest(name=name, ttl_seconds=ttl_seconds)
        return await self._call(self._stub.CreateFederationInvitation, request, timeout)

    async def list_invitations(
        self, *, page_size: int = 0, page_token: str = "", timeout: float | None = None
    ) -> fpb.ListFederationInvitationsResponse:
        request = fpb.ListFederationInvitationsRequest(page_size=page_size, page_token=page_token)
        return await self._call(self._stub.ListFederationInvitations, request, timeout)

    async def iter_invitations(
        self, *, page_size: int = 0, timeout: float | None = None
    ) -> AsyncIterator[fpb.FederationInvitation]:
        async for page in pages(
            lambda token: self.list_invitations(page_size=page_size, page_token=token, timeout=timeout)
        ):
            for invitation in page.invitations:
                yield invitation

    async def delete_invitation(self, id: str, *, timeout: float | None = None) -> None:
        """Revokes an invitation: its code can no longer be redeemed."""
        await self._call(self._stub.DeleteFederationInvitation, fpb.DeleteFederationInvitationRequest(id=id), timeout)
