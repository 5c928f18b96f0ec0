"""A TCP connect that does not wait on the kernel's SYN backoff: a connect with no answer
after `STAGGER_SECONDS` gets a sibling on a fresh socket, and so on until one is made, one
fails, or the time is up.

Why: a SYN that meets no listener is dropped, not refused, where the mesh holds the port
(the capture rules drop a SYN for a tunnel port nobody listens on, a leaving tunnel's
listener drops new SYNs: see meshcore.handoff), so the client's kernel sends it again, at
1, 2, 3, 4, 5, 7 and 11 s on the kernels here (linear first, then doubling). A tunnel that
came back 8 s into a dial was reached only by the SYN at 11 s, after the dial's 10 s: the
dial failed while the port had been open for 2 s. A fresh socket sends its first SYN at once and
leaves from a new source port, so it also lands on another listener of a SO_REUSEPORT
group than a port whose SYNs a leaving listener drops. The earlier attempts stay: their
own retransmissions may still win. The cost is a socket a second while nothing answers.

A refusal is different: something answered. Where the caller allows it (`refused_grace`),
a port refused in the first moments is tried again shortly on a fresh socket, because a
listener that is being replaced refuses for a moment: a waypoint's process that crashed and
is restarted in its pod (the pod keeps its address; nothing drops SYNs for a port the mesh
does not capture). After the grace a refusal ends the connect at once, as before.
"""

from __future__ import annotations

import asyncio
import errno
import socket
from collections.abc import Callable

# How long a connect waits for an answer before a sibling starts: the kernel's first SYN
# retransmission comes at the same time, far above any round trip inside a cluster.
STAGGER_SECONDS = 1.0
# How soon a refused port is tried again within the grace: a listener restarting in place
# is back in about a second; ten SYNs a second to a port that refuses cost next to nothing.
REFUSED_RETRY_SECONDS = 0.1


class StaggeredTimeout(TimeoutError):
    """No attempt was answered in time; `ports` are the source ports they left from."""

    def __init__(self, ports: list[int]) -> None:
        super().__init__(f"no answer to {len(ports)} connect attempts")
        self.ports = ports


async def connect_staggered(
    new_socket: Callable[[], socket.socket],
    address: tuple[str, int] | tuple[str, int, int, int],
    seconds: float,
    stagger: float = STAGGER_SECONDS,
    refused_grace: float = 0.0,
) -> socket.socket:
    """Connect a socket from `new_socket` (non-blocking, not yet connected) to `address`;
    the caller owns the socket returned, every other one is closed here. An attempt's
    error (refused, unreachable) ends the whole connect: something answered; except a
    refusal within `refused_grace` seconds of the start, after which a fresh attempt
    follows in REFUSED_RETRY_SECONDS. Fails with `StaggeredTimeout` after `seconds`. The
    connects are polled with the loop's writer callbacks, not `sock_connect`, which under
    uvloop resolves the numeric address again on a thread."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    deadline = start + seconds
    grace_ends = start + min(refused_grace, seconds)
    result: asyncio.Future[socket.socket] = loop.create_future()
    attempts: list[socket.socket] = []
    timer: asyncio.TimerHandle | None = None
    refusal: Exception | None = None  # the last refusal within the grace

    def writable(sock: socket.socket) -> None:
        loop.remove_writer(sock)
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if result.done():
            return
        if err == 0:
            result.set_result(sock)
        else:
            failed(sock, OSError(err, f"Connect call failed {address}"))

    def failed(sock: socket.socket, e: Exception) -> None:
        nonlocal timer, refusal
        refused = isinstance(e, OSError) and e.errno == errno.ECONNREFUSED
        if not refused or loop.time() >= grace_ends:
            result.set_exception(e)
        else:
            # Refused within the grace: this socket is done with, a fresh one follows soon
            # (sooner than the stagger an unanswered attempt waits).
            refusal = e
            attempts.remove(sock)
            sock.close()
            if timer is not None:
                timer.cancel()
            timer = loop.call_later(min(REFUSED_RETRY_SECONDS, grace_ends - loop.time()), attempt)

    def attempt() -> None:
        nonlocal timer
        timer = None
        if result.done():
            return
        remaining = deadline - loop.time()
        if remaining <= 0:
            # Refused to the end and nothing else pending: that is the answer, not a silence.
            if refusal is not None and not attempts:
                result.set_exception(refusal)
            else:
                result.set_exception(StaggeredTimeout([source_port(s) for s in attempts]))
            return
        # Any error ends the connect through `result`: raised in a timer callback it would
        # only be logged, and the caller would wait for ever.
        try:
            sock = new_socket()
        except Exception as e:
            result.set_exception(e)
            return
        attempts.append(sock)
        try:
            sock.connect(address)
        except (BlockingIOError, InterruptedError):
            loop.add_writer(sock, writable, sock)
        except Exception as e:
            failed(sock, e)
            return
        else:
            result.set_result(sock)  # made at once (loopback may)
            return
        timer = loop.call_later(min(stagger, remaining), attempt)

    attempt()
    winner: socket.socket | None = None
    try:
        winner = await result
        return winner
    finally:
        if timer is not None:
            timer.cancel()
        for sock in attempts:
            if sock is not winner:
                loop.remove_writer(sock)  # before the close: the descriptor may be reused
                sock.close()


def source_port(sock: socket.socket) -> int:
    """The socket's local port (0 when it has none or is closed)."""
    try:
        return int(sock.getsockname()[1])
    except OSError:
        return 0
