"""A peer-facing answer: the federated agents matching one query, and the replies built from them once."""

from __future__ import annotations

from agentvault.federation.v1 import federation_service_pb2 as fpb
from agentvault.registry.v1 import registry_service_pb2 as pb
from agentvault_registry.convert import MEMORY_PER_WIRE_BYTE


class SharedAnswer:
    """Federated agents matching one query, and the replies built from them, each built once."""

    __slots__ = ("_list_reply", "_registry_name", "_search_reply", "agents", "generation", "weight")

    def __init__(self, agents: list[pb.Agent], registry_name: str, generation: int = 0) -> None:
        self.agents = agents
        self._registry_name = registry_name
        # The sharing generation read before the agents were: the answer is at least as new as it.
        self.generation = generation
        self._search_reply: fpb.SearchAgentsResponse | None = None
        self._list_reply: pb.ListAgentsResponse | None = None
        # What the answer may cost in memory: the agents and the copies in its replies (about 1.2 times the
        # serialized size each; both replies are rarely built, the seed's REST form being the exception).
        self.weight = 2 * MEMORY_PER_WIRE_BYTE * sum(a.ByteSize() for a in agents)

    def search_reply(self) -> fpb.SearchAgentsResponse:
        if self._search_reply is None:
            self._search_reply = fpb.SearchAgentsResponse(
                agents=self.agents, registry_name=self._registry_name, generation=self.generation
            )
        return self._search_reply

    def list_reply(self) -> pb.ListAgentsResponse:
        if self._list_reply is None:
            self._list_reply = pb.ListAgentsResponse(agents=self.agents)
        return self._list_reply
