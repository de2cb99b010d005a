"""Conversation affinity for Ray Serve replicas: a chat's requests reach the replica whose prefix cache holds it.

Ray's HTTP proxy reads a session id from the ``x-session-id`` header (``RAY_SERVE_SESSION_ID_HEADER_KEY``) into
each request's metadata. This router ranks replicas by rendezvous hashing of that id, so every turn of a
conversation goes to the same replica while it lives, and when replicas come or go only the conversations of
those replicas move. The next replicas in the ranking take a turn when the first is full; requests without a
session id go to the less loaded of two random replicas, as Ray's default router sends them. The router sees
headers, not bodies (the proxy forwards the body to the replica unread), hence a session id rather than the
prompt's prefix. Imported only by Ray Serve (``fastllm[ray]``).
"""

from __future__ import annotations

import hashlib
import random

from ray.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica


class SessionAffinityRouter(FIFOMixin, RequestRouter):
    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        session = pending_request.metadata.session_id if pending_request is not None else ""
        if not session:
            return [random.sample(candidate_replicas, min(2, len(candidate_replicas)))]
        ranked = sorted(candidate_replicas, key=lambda replica: _weight(session, replica.replica_id.unique_id))
        return [[replica] for replica in ranked]


def _weight(session: str, replica: str) -> bytes:
    return hashlib.sha256(f"{session}\0{replica}".encode()).digest()
