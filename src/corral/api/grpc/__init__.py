"""The gRPC API: servicers over the service layer; the wire contract is ``corral.v1``.

Only the NodeService (the node agents' door to the servers) so far.
"""

from __future__ import annotations

from corral.api.grpc.node import NodeServicer, start_grpc_server, status_of

__all__ = ["NodeServicer", "start_grpc_server", "status_of"]
