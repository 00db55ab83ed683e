"""A stage's KV caches, one per session, freed on END, on request or after idling."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable


class TooManySessions(RuntimeError):
    pass


@dataclass
class Session:
    cache: Any
    last_used: float = field(default_factory=time.monotonic)
    # Frames with an epoch below this were cancelled out of band: skip them.
    min_epoch: int = 0


class SessionStore:
    def __init__(self, new_cache: Callable[[], Any], *, max_sessions: int, idle_seconds: float):
        self._new_cache = new_cache
        self._max_sessions = max_sessions
        self._idle_seconds = idle_seconds
        self._sessions: dict[str, Session] = {}

    def __contains__(self, session_id: str) -> bool:
        return session_id in self._sessions

    def __len__(self) -> int:
        return len(self._sessions)

    def items(self):
        return list(self._sessions.items())

    def get(self, session_id: str) -> Session | None:
        session = self._sessions.get(session_id)
        if session is not None:
            session.last_used = time.monotonic()
        return session

    def get_or_create(self, session_id: str) -> Session:
        session = self._sessions.get(session_id)
        if session is None:
            if len(self._sessions) >= self._max_sessions:
                raise TooManySessions(
                    f"this stage already holds {self._max_sessions} sessions"
                )
            session = self._sessions[session_id] = Session(self._new_cache())
        session.last_used = time.monotonic()
        return session

    def pop(self, session_id: str) -> Session | None:
        return self._sessions.pop(session_id, None)

    def expire_idle(self) -> list[str]:
        deadline = time.monotonic() - self._idle_seconds
        expired = [sid for sid, s in self._sessions.items() if s.last_used < deadline]
        for session_id in expired:
            del self._sessions[session_id]
        return expired

    def clear(self) -> None:
        self._sessions.clear()
