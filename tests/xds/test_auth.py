"""Who may subscribe to discovery: the pure decisions as tables, and what a flood of bad
tokens may cost the API server.

The TokenReview itself needs a real API server (root tier: tests/xds/test_auth_kube.py);
here the reviewer is a stub that answers from a table and counts the reviews asked of it,
and the tests that use it say so in their names."""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass, field

import grpc
import pytest

from controlplane.ca_grpc_auth import Caller, Code, RateLimiter, Refusal
from controlplane.xds.auth import (
    OVERALL_BURST,
    OVERALL_RATE,
    PER_SOURCE_BURST,
    SubscriberAuth,
)
from controlplane.xds.server import XdsServer
from controlplane.xds.subscribers import (
    ReviewCache,
    Subscriber,
    Via,
    authorize,
    certificate_subscriber,
    peer_source,
    refusal,
    token_key,
)
from controlplane.xds.tls import server_identity
from meshcore.xds import messages as m
from meshcore.xds.client import XdsClient, XdsTarget
from meshcore.xds.convert import RESOURCE_TYPES
from meshcore.xds.grpc import GrpcClosed, GrpcStream, client_context
from tests.support.aio import Loop
from tests.xds.conftest import Harness
from tests.xds.states import demo_state

TD = "cluster.local"
GOOD = "good-token"
ALICE = Caller("apps", "alice", "alice-1", "uid-1")


@dataclass
class StubReviewer:
    """Stands in for the API server's TokenReview (no API server runs in this tier)."""

    valid: dict[str, Caller] = field(default_factory=lambda: {GOOD: ALICE})
    asked: list[str] = field(default_factory=list)
    down: bool = False

    async def review(self, token: str) -> Caller | Refusal:
        self.asked.append(token)
        if self.down:
            return Refusal(Code.UNAVAILABLE, "cannot check the token with the API server")
        caller = self.valid.get(token)
        if caller is None:
            return Refusal(Code.UNAUTHENTICATED, "unauthenticated: token not valid")
        return caller


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


def sans(*values: str) -> dict[str, list[bytes]]:
    return {"x509_pem_cert": [b"-----BEGIN CERTIFICATE-----"], "x509_subject_alternative_name": [
        v.encode() for v in values
    ]}  # fmt: skip


@pytest.mark.parametrize(
    ("context", "expected"),
    [
        ({}, "no client certificate"),
        (sans("spiffe://cluster.local/ns/istio-system/sa/ztunnel"),
         Subscriber(Via.CERTIFICATE, "spiffe://cluster.local/ns/istio-system/sa/ztunnel",
                    "istio-system", "ztunnel")),
        (sans("spiffe://other.td/ns/a/sa/b"), "outside trust domain 'cluster.local'"),
        (sans("spiffe://cluster.local/ns/a/sa/b", "spiffe://cluster.local/ns/a/sa/c"),
         "2 URI SANs, not exactly one"),
        (sans("istiod.istio-system.svc"), "0 URI SANs, not exactly one"),
        (sans("https://example.com/x"), "not a SPIFFE id"),
    ],
)  # fmt: skip
def test_certificate_subscriber(context: dict[str, list[bytes]], expected: object) -> None:
    got = certificate_subscriber(context, TD)
    if isinstance(expected, Subscriber):
        assert got == expected
    else:
        assert isinstance(got, str) and str(expected) in got, got


def test_refusal_names_every_reason_in_order() -> None:
    r = refusal(["no client certificate", "unauthenticated: no token: send it"])
    assert r.code is Code.UNAUTHENTICATED
    assert r.reason == "unauthenticated xDS subscriber: no client certificate; no token: send it"


@pytest.mark.parametrize(
    ("peer", "source"),
    [
        ("ipv4:10.0.0.7:51234", "ipv4:10.0.0.7"),
        ("ipv6:[::1]:443", "ipv6:[::1]"),
        ("unix:/run/istiod.sock", "unix:"),
        ("unix:", "unix:"),
        ("", ""),
    ],
)
def test_peer_source_drops_the_port(peer: str, source: str) -> None:
    assert peer_source(peer) == source


def test_review_cache_keeps_accepted_longer_than_refused_and_never_an_outage() -> None:
    cache = ReviewCache(accepted_ttl=60, refused_ttl=10, max_entries=2)
    bad = Refusal(Code.UNAUTHENTICATED, "no")
    cache.put("a", ALICE, 0)
    cache.put("b", bad, 0)
    cache.put("c", Refusal(Code.UNAVAILABLE, "API server down"), 0)  # decides nothing
    assert cache.get("c", 1) is None
    assert cache.get("b", 9.9) == bad and cache.get("b", 10) is None
    assert cache.get("a", 59.9) == ALICE and cache.get("a", 60) is None
    for i in range(5):
        cache.put(f"k{i}", ALICE, 100)
    assert len(cache) == 2  # bounded: the oldest dropped


def test_review_cache_forgets_the_tokens_of_a_deleted_pod_at_once() -> None:
    cache = ReviewCache(accepted_ttl=60, refused_ttl=10, max_entries=3, gone_ttl=120)
    pod1 = Caller("apps", "web", pod_name="web-1", pod_uid="p-1")
    pod2 = Caller("apps", "web", pod_name="web-2", pod_uid="p-2")
    cache.put("t1", pod1, 0)
    cache.put("t1b", pod1, 0)  # a second token bound to the same pod
    cache.put("t2", pod2, 0)
    assert cache.forget_pod("p-1", 1) == 2
    assert cache.get("t1", 1) is None and cache.get("t1b", 1) is None
    assert cache.get("t2", 1) == pod2  # another pod's token stays
    assert cache.pod_gone("p-1", 1) and cache.pod_gone("p-1", 120.9)
    assert not cache.pod_gone("p-1", 121) and not cache.pod_gone("p-2", 1)
    assert not cache.pod_gone("", 1)
    assert cache.forget_pod("p-1", 1) == 0 and cache.forget_pod("unknown", 1) == 0
    # Expired, replaced and evicted entries leave nothing in the index behind.
    cache.put("t3", pod1, 0)
    assert cache.get("t3", 60) is None
    cache.put("t4", pod1, 0)
    cache.put("t4", Caller("apps", "web"), 0)  # the same token, now without a pod
    for i in range(5):
        cache.put(f"k{i}", pod2, 100)
    assert cache.forget_pod("p-1", 1) == 0
    assert cache.forget_pod("p-2", 101) == 3 and len(cache) == 0


def test_the_cache_holds_digests_not_tokens() -> None:
    assert token_key("secret") == hashlib.sha256(b"secret").hexdigest()


def auth(reviewer: StubReviewer, clock: Clock, **kw: object) -> SubscriberAuth:
    return SubscriberAuth(TD, reviewer=reviewer, clock=clock, **kw)  # type: ignore[arg-type]


def test_each_way_and_its_refusal__stub_reviewer(aio: Loop) -> None:
    reviewer, clock = StubReviewer(), Clock()
    a = auth(reviewer, clock, node_tokens={"n1-token": "node1"})

    async def main() -> None:
        ok = await a.authenticate(bearer(GOOD), {}, "ipv4:10.0.0.1:1")
        assert ok == Subscriber(
            Via.SERVICE_ACCOUNT_TOKEN, "apps/alice", "apps", "alice", ALICE.pod_uid
        )
        node = await a.authenticate(bearer("n1-token"), {}, "ipv4:10.0.0.1:1")
        assert node == Subscriber(Via.NODE_TOKEN, "node/node1")
        assert reviewer.asked == [GOOD]  # a node token needs no review
        none = await a.authenticate([], {}, "ipv4:10.0.0.1:1")
        assert isinstance(none, Refusal) and none.code is Code.UNAUTHENTICATED
        assert "no client certificate" in none.reason and "no token" in none.reason
        wrong = await a.authenticate(bearer("forged"), {}, "ipv4:10.0.0.1:1")
        assert isinstance(wrong, Refusal) and wrong.code is Code.UNAUTHENTICATED
        assert "not a node token" in wrong.reason and "token not valid" in wrong.reason
        reviewer.down = True
        down = await a.authenticate(bearer("fresh"), {}, "ipv4:10.0.0.1:1")
        assert isinstance(down, Refusal) and down.code is Code.UNAVAILABLE
        # Without a reviewer and node tokens, a token is refused as such.
        bare = SubscriberAuth(TD)
        got = await bare.authenticate(bearer(GOOD), {}, "ipv4:10.0.0.1:1")
        assert isinstance(got, Refusal) and "tokens are not accepted here" in got.reason
        # Unauthenticated subscribers only where asked for by name.
        open_ = SubscriberAuth.unauthenticated(TD)
        anyone = await open_.authenticate([], {}, "ipv4:10.0.0.1:1")
        assert anyone == Subscriber(Via.UNAUTHENTICATED, "ipv4:10.0.0.1:1")

    aio.run(main)


def test_a_deleted_pods_token_is_refused_though_the_api_server_still_says_yes__stub_reviewer(
    aio: Loop,
) -> None:
    """The API server caches its own yes to a token for seconds after the token's pod is
    deleted (the stub goes on saying yes for ever): the pod's deletion decides."""
    reviewer, clock = StubReviewer(), Clock()
    a = auth(reviewer, clock)

    async def main() -> None:
        ok = await a.authenticate(bearer(GOOD), {}, "ipv4:10.0.0.1:1")
        assert isinstance(ok, Subscriber)
        a.pod_deleted("another-pod")
        assert isinstance(await a.authenticate(bearer(GOOD), {}, "ipv4:10.0.0.1:1"), Subscriber)
        assert reviewer.asked == [GOOD]  # answered by the cache
        a.pod_deleted(ALICE.pod_uid)
        gone = await a.authenticate(bearer(GOOD), {}, "ipv4:10.0.0.1:1")
        assert isinstance(gone, Refusal) and gone.code is Code.UNAUTHENTICATED
        assert "apps/alice-1" in gone.reason and "was deleted" in gone.reason
        assert reviewer.asked == [GOOD, GOOD]  # asked again, and its yes overruled

    aio.run(main)


def test_a_flood_of_bad_tokens_makes_a_bounded_number_of_reviews__stub_reviewer(
    aio: Loop,
) -> None:
    reviewer, clock = StubReviewer(), Clock()
    a = auth(reviewer, clock)

    async def main() -> None:
        # One host, 1000 distinct bad tokens at once: its own burst of reviews, no more.
        outcomes = [
            await a.authenticate(bearer(f"bad-{i}"), {}, f"ipv4:10.0.0.9:{i}") for i in range(1000)
        ]
        assert len(reviewer.asked) == PER_SOURCE_BURST
        limited = [o for o in outcomes if isinstance(o, Refusal)]
        assert len(limited) == 1000
        assert sum(o.code is Code.RESOURCE_EXHAUSTED for o in limited) == 1000 - PER_SOURCE_BURST
        assert "too many new tokens to review from ipv4:10.0.0.9" in limited[-1].reason
        # The same bad token again and again: one review, then the cache answers.
        reviewer.asked.clear()
        clock.now += 3600
        for _ in range(100):
            again = await a.authenticate(bearer("repeated"), {}, "ipv4:10.0.0.8:1")
            assert isinstance(again, Refusal) and again.code is Code.UNAUTHENTICATED
        assert reviewer.asked == ["repeated"]
        # Many hosts at once: the whole server's burst, no more.
        reviewer.asked.clear()
        clock.now += 3600
        for i in range(1000):
            await a.authenticate(bearer(f"spread-{i}"), {}, f"ipv4:10.1.{i // 250}.{i % 250}:1")
        assert len(reviewer.asked) == OVERALL_BURST
        # A second later, the overall rate's worth more.
        reviewer.asked.clear()
        clock.now += 1.0
        for i in range(1000):
            await a.authenticate(bearer(f"later-{i}"), {}, f"ipv4:10.2.{i // 250}.{i % 250}:1")
        assert len(reviewer.asked) == int(OVERALL_RATE)
        # A subscriber whose token was accepted before the flood is still served from the
        # cache, the spent rate notwithstanding.
        clock.now += 3600
        assert isinstance(await a.authenticate(bearer(GOOD), {}, "ipv4:10.3.0.1:1"), Subscriber)
        for i in range(200):
            await a.authenticate(bearer(f"flood-{i}"), {}, f"ipv4:10.4.{i}.1:1")
        served = await a.authenticate(bearer(GOOD), {}, "ipv4:10.3.0.1:2")
        assert served == Subscriber(
            Via.SERVICE_ACCOUNT_TOKEN, "apps/alice", "apps", "alice", ALICE.pod_uid
        )

    aio.run(main)


# A waypoint of namespace apps, as Istio's node ids say it (what GOOD, apps/alice, may be).
APPS_PROXY = "router~10.0.0.9~wp-5d4f.apps~apps.svc.cluster.local"


async def open_stream(
    port: int, roots: bytes, token: str | None, node: str = APPS_PROXY
) -> GrpcStream:
    """An ADS stream that has asked for every resource type, as `node`, with `token`."""
    stream = await GrpcStream.open(
        "127.0.0.1",
        port,
        m.ADS_METHOD,
        ssl_context=client_context(roots),
        expected=server_identity(TD),
        connect_limit=10,
        max_message=m.MAX_MESSAGE_SIZE,
        metadata=tuple(bearer(token)) if token is not None else (),
    )
    try:
        for i, t in enumerate(RESOURCE_TYPES):
            first = m.Node(id=node) if i == 0 else None
            await stream.send(m.encode(m.DeltaDiscoveryRequest(node=first, type_url=t)))
    except BaseException:
        await stream.close()
        raise
    return stream


async def first_answer(
    port: int, roots: bytes, token: str | None, node: str = APPS_PROXY
) -> GrpcClosed | bytes:
    stream = await open_stream(port, roots, token, node)
    try:
        try:
            return await stream.recv()
        except GrpcClosed as ended:
            return ended
    finally:
        await stream.close()


async def end_of(stream: GrpcStream, within: float) -> GrpcClosed | None:
    """Read the open stream until it ends: how it ended, or None if it still runs after
    `within` seconds."""
    try:
        async with asyncio.timeout(within):
            while True:
                await stream.recv()
    except GrpcClosed as ended:
        return ended
    except TimeoutError:
        return None


def test_an_open_stream_ends_once_its_token_is_revoked_not_on_an_outage__stub_reviewer(
    aio: Loop, harness: Harness
) -> None:
    """Streams judged again every 0.3 s (the cache keeps an answer 0.1 s): one whose token
    the reviewer stops accepting ends UNAUTHENTICATED; while the reviewer cannot answer at
    all, the other runs on. A stream whose token's pod is deleted ends at once, long
    before its next periodic check."""
    reviewer = StubReviewer()
    bob = Caller("apps", "bob", "bob-1", "uid-2")
    reviewer.valid["bob-token"] = bob
    reviewer.valid["carol-token"] = Caller("apps", "carol", "carol-1", "uid-3")
    fast = SubscriberAuth(TD, reviewer=reviewer, cache=ReviewCache(accepted_ttl=0.1))
    server = XdsServer(demo_state(), auth=fast, recheck_period=0.3)
    slow_auth = SubscriberAuth(TD, reviewer=reviewer)
    slow = XdsServer(demo_state(), auth=slow_auth, recheck_period=3600)
    unauthenticated = grpc.StatusCode.UNAUTHENTICATED.value[0]

    async def main() -> None:
        port = await harness.serve(server)
        slow_port = await harness.serve(slow)
        roots = harness.ca.roots_pem()
        alice = await open_stream(port, roots, GOOD)
        aio.defer(alice.close)
        bob_stream = await open_stream(port, roots, "bob-token")
        aio.defer(bob_stream.close)
        carol = await open_stream(slow_port, roots, "carol-token")
        aio.defer(carol.close)
        for s in (alice, bob_stream, carol):
            assert isinstance(await s.recv(), bytes)  # served
        reviewer.valid.pop("bob-token")  # revoked: the API server now says no
        ended = await end_of(bob_stream, 5)
        assert ended is not None and ended.status == unauthenticated, ended
        assert server.revoked == 1
        reviewer.down = True  # nobody can say anything about alice's token now
        assert await end_of(alice, 1.5) is None  # checked several times, and kept
        # Carol's stream is checked once an hour; her pod's deletion checks it now.
        slow_auth.pod_deleted("uid-3")
        ended = await end_of(carol, 5)
        assert ended is not None and ended.status == unauthenticated, ended
        assert "was deleted" in ended.message and slow.revoked == 1

    aio.run(main)


def test_over_grpc_a_flood_is_refused_and_a_known_subscriber_served__stub_reviewer(
    aio: Loop, harness: Harness
) -> None:
    reviewer = StubReviewer()
    limits = SubscriberAuth(
        TD,
        reviewer=reviewer,
        per_source=RateLimiter(0.001, 3),  # no refill within the test
        overall=RateLimiter(1.0, 100),
    )
    server = XdsServer(demo_state(), auth=limits)

    async def main() -> None:
        port = await harness.serve(server)
        roots = harness.ca.roots_pem()
        good = XdsClient(
            XdsTarget("127.0.0.1", port, client_context(roots), server_identity(TD)),
            m.Node(id=APPS_PROXY),
            lambda _s: None,
            RESOURCE_TYPES,
            credentials=lambda: tuple(bearer(GOOD)),
        )
        aio.defer(good.close)
        await good.start(wait=20)
        answers = await asyncio.gather(*(first_answer(port, roots, f"bad-{i}") for i in range(10)))
        codes = sorted(a.status for a in answers if isinstance(a, GrpcClosed))
        assert len(codes) == 10  # no resource went to any of them
        unauthenticated = grpc.StatusCode.UNAUTHENTICATED.value[0]
        exhausted = grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
        # The good subscriber took one review of the bucket of 3; two bad tokens got theirs.
        assert codes == sorted([unauthenticated] * 2 + [exhausted] * 8)
        assert len(reviewer.asked) == 3
        assert server.refused == 10 and limits.limited == 8
        # The known subscriber reconnects and is served from the cache.
        again = await first_answer(port, roots, GOOD)
        assert isinstance(again, bytes)
        assert len(reviewer.asked) == 3

    aio.run(main)


TUNNELS = frozenset({("istio-system", "ztunnel")})
ZTUNNEL_SA = Subscriber(
    Via.SERVICE_ACCOUNT_TOKEN, "istio-system/ztunnel", "istio-system", "ztunnel"
)
ALICE_SA = Subscriber(Via.SERVICE_ACCOUNT_TOKEN, "apps/alice", "apps", "alice")
ALICE_CERT = Subscriber(Via.CERTIFICATE, "spiffe://cluster.local/ns/apps/sa/alice", "apps", "alice")


@pytest.mark.parametrize(
    ("subscriber", "node", "denied"),
    [
        (ZTUNNEL_SA, "node1", None),  # the tunnels' account, as any node's tunnel
        (ZTUNNEL_SA, APPS_PROXY, None),
        (ALICE_SA, APPS_PROXY, None),  # a proxy of its own namespace
        (ALICE_CERT, APPS_PROXY, None),
        (ALICE_SA, "node1", "names no namespace"),  # a workload posing as a tunnel
        (ALICE_CERT, "router~10.0.0.9~wp.prod~prod.svc.cluster.local", "claims namespace 'prod'"),
        (ALICE_SA, "router~10.0.0.9~wp~apps.svc.cluster.local", "names no namespace"),
        (ALICE_SA, "a~b~c.apps", "names no namespace"),  # not four parts
        (ALICE_SA, "", "names no node"),
        (Subscriber(Via.NODE_TOKEN, "node/node1"), "node2", None),  # a node's own credential
        (Subscriber(Via.NODE_TOKEN, "node/node1"), "", None),
        (Subscriber(Via.UNAUTHENTICATED, "ipv4:10.0.0.1:1"), "x", None),
    ],
)
def test_who_may_subscribe_as_which_node(
    subscriber: Subscriber, node: str, denied: str | None
) -> None:
    got = authorize(subscriber, node, TUNNELS)
    if denied is None:
        assert got is None
    else:
        assert got is not None and got.code is Code.PERMISSION_DENIED
        assert denied in got.reason and str(subscriber) in got.reason


def test_a_workload_posing_as_a_tunnel_gets_nothing_over_grpc__stub_reviewer(
    aio: Loop, harness: Harness
) -> None:
    server = XdsServer(demo_state(), auth=SubscriberAuth(TD, reviewer=StubReviewer()))

    async def main() -> None:
        port = await harness.serve(server)
        roots = harness.ca.roots_pem()
        posing = await first_answer(port, roots, GOOD, node="node1")
        assert isinstance(posing, GrpcClosed)  # no resource went out
        assert posing.status == grpc.StatusCode.PERMISSION_DENIED.value[0]
        assert "apps/alice" in posing.message and "'node1'" in posing.message
        assert server.denied == 1
        served = await first_answer(port, roots, GOOD)  # as a proxy of its own namespace
        assert isinstance(served, bytes)

    aio.run(main)
