"""The server's connections, held to what front proxies enforce (nginx's client_header_timeout and
client_body_timeout, limit_conn per address): a request's headers and its body must each arrive within a deadline,
and one address, or all of them together, may hold only so many connections open.

uvicorn closes idle keep-alive connections (`timeout_keep_alive`) and refuses requests past `limit_concurrency`,
but a connection that sends its headers one slow line at a time (slowloris) stayed open for ever, and every such
connection held a file descriptor until a new client was reset. This protocol adds the missing deadlines and caps
to uvicorn's own h11 protocol; everything else is uvicorn's.
"""

from __future__ import annotations

import logging
import resource
from collections import Counter
from dataclasses import dataclass

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("peft_adapt.server")


@dataclass(frozen=True)
class ConnectionLimits:
    header_timeout_s: float = 10.0  # from a connection's first byte (or the last response) to its headers' end
    body_timeout_s: float = 30.0  # from the headers' end to the body's end
    keep_alive_s: float = 5.0  # an idle connection between requests (uvicorn's timeout_keep_alive)
    max_connections: int = 512  # open at once, in all (under the 1,024 file descriptors a process often gets)
    max_per_peer: int = 64  # open at once from one address


def guarded_protocol(limits: ConnectionLimits) -> type[H11Protocol]:
    """uvicorn's h11 protocol with `limits`' deadlines and caps; one class (and one count of peers) per server."""
    open_by_peer: Counter = Counter()
    # connections sending no request: still in its headers, or idle between requests; the oldest first. At the cap
    # the oldest of these makes room for a new connection, so a slow client ages out before a new one is refused.
    waiting: dict = {}

    class GuardedH11Protocol(H11Protocol):
        _deadline = None
        _phase = None
        _peer = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            peer = self.client[0] if self.client else None
            if len(self.connections) > limits.max_connections and waiting:
                oldest = next(iter(waiting))
                log.debug("closed the oldest waiting connection (from %s) to make room", oldest._peer)
                oldest.transport.abort()
                oldest._forget()
                self.connections.discard(oldest)  # its connection_lost comes later; its place is free now
            if len(self.connections) > limits.max_connections or open_by_peer[peer] >= limits.max_per_peer:
                log.debug("refused a connection from %s: %d open from it, %d in all", peer, open_by_peer[peer],
                          len(self.connections))
                transport.abort()  # before a byte is read: the descriptor is freed at once
                return
            self._peer = peer
            open_by_peer[peer] += 1
            self._arm("headers", limits.header_timeout_s)

        def connection_lost(self, exc) -> None:
            self._forget()
            super().connection_lost(exc)

        def _forget(self) -> None:
            """No longer counted: its deadline, its place among the waiting and its peer's count go."""
            self._disarm()
            waiting.pop(self, None)
            if self._peer is not None:
                open_by_peer[self._peer] -= 1
                if open_by_peer[self._peer] <= 0:
                    del open_by_peer[self._peer]
                self._peer = None

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            state = self.conn.their_state
            if state is h11.IDLE:  # a request's headers are arriving (after a keep-alive pause, too)
                if self._phase != "headers":
                    self._arm("headers", limits.header_timeout_s)
            elif state is h11.SEND_BODY:
                if self._phase != "body":
                    self._arm("body", limits.body_timeout_s)
            else:  # the request is in: the app's turn (uvicorn's keep-alive timer takes over after the response)
                self._disarm()
            if state is not h11.IDLE:
                waiting.pop(self, None)

        def on_response_complete(self) -> None:
            self._disarm()
            if self._peer is not None:
                waiting[self] = None  # idle until its next request: evictable
            super().on_response_complete()

        def _arm(self, phase: str, seconds: float) -> None:
            self._disarm()
            self._phase = phase
            self._deadline = self.loop.call_later(seconds, self._too_slow)
            if phase == "headers" and self not in waiting:
                waiting[self] = None

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
            self._deadline = self._phase = None

        def _too_slow(self) -> None:
            log.debug("closed a connection from %s: its request's %s took longer than allowed", self._peer,
                      self._phase)
            self._deadline = None
            if not self.transport.is_closing():
                self.transport.abort()

    return GuardedH11Protocol


def raise_open_file_limit(wanted: int) -> int:
    """The soft limit on open files raised toward `wanted` (never past the hard limit); the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft
