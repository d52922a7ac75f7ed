"""What a gateway needs of a pipeline, and the registry of a pipeline's sessions.

Two pipelines implement `Pipeline`: `LocalPipeline` (one in-process engine per backend) and
`actors.pipeline.RayPipeline` (sessions pinned to inference replica actors). The gateway
(ray_lipsync/api/gateway.py) uses only this protocol.
"""

from __future__ import annotations

import collections
from typing import Protocol

from ray_lipsync.errors import UnknownSession
from ray_lipsync.streaming.session import Session


class Pipeline(Protocol):
    async def create_session(self, avatar: str = "default", backend: str | None = None,
                             session_id: str | None = None) -> Session:
        """A new session on `avatar` (raises AtCapacity, UnknownAvatar, BackendUnavailable);
        `session_id`: the pipeline's id for it (default: a new random one)."""
        ...

    def get(self, session_id: str) -> Session: ...

    def sessions(self) -> list[Session]: ...

    async def close_session(self, session_id: str) -> None: ...

    async def replica_stats(self) -> list[dict]:
        """Per inference replica (engine): `EngineStats` fields, plus placement state."""
        ...

    async def health(self) -> list[str]:
        """Names of the stages unavailable right now (empty: all well)."""
        ...

    async def shutdown(self) -> None: ...


REMEMBERED_NEEDS = 250  # speech frames (10 s) of closed sessions' playout needs


class SessionRegistry:
    """The open sessions of one pipeline, by id, and what the closed ones needed of the
    playout delay (`playout_needs`: a new session's first D starts from both)."""

    def __init__(self, remembered_needs: int = REMEMBERED_NEEDS) -> None:
        self._sessions: dict[str, Session] = {}
        self._closed_needs: dict[bool, collections.deque[float]] = {
            streamed: collections.deque(maxlen=remembered_needs) for streamed in (False, True)}

    def __len__(self) -> int:
        return len(self._sessions)

    def add(self, session: Session) -> None:
        self._sessions[session.session_id] = session

    def get(self, session_id: str) -> Session:
        session = self._sessions.get(session_id)
        if session is None or session.closed:
            raise UnknownSession(f"no session {session_id!r}")
        return session

    def sessions(self) -> list[Session]:
        return [s for s in self._sessions.values() if not s.closed]

    def forget(self, session_id: str) -> None:
        session = self._sessions.pop(session_id, None)
        if session is not None:
            for streamed, needs in self._closed_needs.items():
                needs.extend(session.playout_needs_ms(streamed))  # the deque keeps the last ones

    def playout_needs(self, window: int, streamed: bool = False) -> list[float]:
        """The last `window` playout needs (ms) of the closed sessions and of each open one,
        of their utterances pushed whole (`streamed`: of their streamed ones)."""
        needs = list(self._closed_needs[streamed])[-window:]
        for session in self.sessions():
            needs.extend(session.playout_needs_ms(streamed)[-window:])
        return needs

    async def close_all(self) -> None:
        for session in list(self._sessions.values()):
            await session.close()
