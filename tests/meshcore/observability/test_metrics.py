"""TCP metrics: label derivation and the counters as Prometheus scrapes them."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from meshcore.identity.spiffe import SpiffeId
from meshcore.observability.metrics import (
    LABEL_NAMES,
    ResponseFlags,
    TcpLabels,
    TcpMetrics,
    tcp_labels,
)
from meshcore.state import (
    Workload,
)
from tests.support.mesh import ports, service, vips, workload


def wl(name: str, namespace: str, sa: str, **kw: Any) -> Workload:
    fields: dict[str, Any] = {
        "uid": f"{namespace}/{name}",
        "name": f"{name}-7d4f9-abcde",
        "namespace": namespace,
        "service_account": sa,
        "canonical_name": name,
        "canonical_revision": "v1",
        "workload_name": name,
    }
    return workload(**{**fields, **kw})


FRONTEND = wl("frontend", "travel", "frontend")
BOOKINGS = wl("bookings", "travel", "bookings", canonical_revision="v2")
BOOKINGS_SVC = service(
    name="bookings", namespace="travel", vips=vips("10.96.0.20"), ports=ports({80: 9000})
)


def labels(**kw: Any) -> TcpLabels:
    args: dict[str, Any] = {
        "reporter": "source",
        "source": FRONTEND,
        "source_identity": FRONTEND.identity,
        "destination": BOOKINGS,
        "destination_identity": BOOKINGS.identity,
        "service": BOOKINGS_SVC,
        "mtls": True,
    }
    args.update(kw)
    return tcp_labels(**args)


# -- tcp_labels -----------------------------------------------------------------------------


def test_labels_of_an_mtls_connection_between_known_workloads():
    got = labels()
    assert got == TcpLabels(
        reporter="source",
        source_workload="frontend",
        source_canonical_service="frontend",
        source_canonical_revision="v1",
        source_workload_namespace="travel",
        source_principal="spiffe://cluster.local/ns/travel/sa/frontend",
        source_app="frontend",
        source_version="v1",
        source_cluster="Kubernetes",
        destination_workload="bookings",
        destination_canonical_service="bookings",
        destination_canonical_revision="v2",
        destination_workload_namespace="travel",
        destination_principal="spiffe://cluster.local/ns/travel/sa/bookings",
        destination_app="bookings",
        destination_version="v2",
        destination_cluster="Kubernetes",
        destination_service="bookings.travel.svc.cluster.local",
        destination_service_name="bookings",
        destination_service_namespace="travel",
        request_protocol="tcp",
        response_flags="-",
        connection_security_policy="mutual_tls",
    )


def test_everything_unknown_when_nothing_is_known():
    got = tcp_labels(
        reporter="destination",
        source=None,
        source_identity=None,
        destination=None,
        destination_identity=None,
        service=None,
        mtls=False,
    )
    values = dict(zip(LABEL_NAMES, got.values(), strict=True))
    assert values.pop("reporter") == "destination"
    assert values.pop("request_protocol") == "tcp"
    assert values.pop("response_flags") == "-"
    assert values.pop("connection_security_policy") == "unknown"
    assert set(values.values()) == {"unknown"}


@pytest.mark.parametrize(
    ("kw", "field", "want"),
    [
        # The source principal is what the client proved: nothing without mTLS.
        ({"mtls": False}, "source_principal", "unknown"),
        ({"source_identity": None}, "source_principal", "unknown"),
        # An inbound peer the mesh has no workload for still has its proven identity.
        (
            {"source": None, "source_identity": SpiffeId("cluster.local", "ext", "client")},
            "source_principal",
            "spiffe://cluster.local/ns/ext/sa/client",
        ),
        ({"source": None}, "source_workload", "unknown"),
        ({"source": None}, "source_workload_namespace", "unknown"),
        # Without an explicit identity the destination principal is its workload's.
        ({"destination_identity": None}, "destination_principal", str(BOOKINGS.identity)),
        (
            {"destination": None, "destination_identity": None},
            "destination_principal",
            "unknown",
        ),
        # The destination principal does not depend on mTLS (upstream reports it anyway).
        ({"mtls": False}, "destination_principal", str(BOOKINGS.identity)),
        ({"mtls": False}, "connection_security_policy", "unknown"),
        ({"service": None}, "destination_service", "unknown"),
        ({"service": None}, "destination_service_name", "unknown"),
        ({"service": None}, "destination_service_namespace", "unknown"),
        ({"response_flags": ResponseFlags.DENY}, "response_flags", "DENY"),
        ({"response_flags": "CONNECT"}, "response_flags", "CONNECT"),
        ({"reporter": "destination"}, "reporter", "destination"),
        # Empty values are missing values.
        ({"source": replace(FRONTEND, canonical_revision="")}, "source_version", "unknown"),
        ({"destination": replace(BOOKINGS, cluster_id="")}, "destination_cluster", "unknown"),
    ],
)
def test_label_table(kw, field, want):
    assert getattr(labels(**kw), field) == want


def test_app_and_version_come_from_the_canonical_name_and_revision():
    src = replace(FRONTEND, canonical_name="web", canonical_revision="canary", workload_name="fe")
    got = labels(source=src)
    assert (got.source_workload, got.source_app, got.source_version) == ("fe", "web", "canary")
    assert got.source_canonical_service == "web"


def test_labels_are_plain_strings_even_from_enums():
    got = labels(response_flags=ResponseFlags.TLS_FAILURE)
    assert all(type(v) is str for v in got.values())


def test_bad_reporter_is_refused():
    with pytest.raises(ValueError, match="reporter"):
        labels(reporter="client")


# -- TcpMetrics -----------------------------------------------------------------------------


def scrape(m: TcpMetrics) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """sample name -> {sorted labels: value}, parsed back from the exposition text."""
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(m.render().decode()):
        for s in family.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def key(lab: TcpLabels) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(zip(LABEL_NAMES, lab.values(), strict=True)))


def test_bytes_add_up_over_several_connections():
    m = TcpMetrics()
    a = labels()
    b = labels(reporter="destination")
    for received, sent in [(100, 1000), (5, 7), (0, 0)]:
        m.opened(a)
        m.closed(a, received=received, sent=sent)
    m.opened(b)
    m.closed(b, received=42, sent=43)

    got = scrape(m)
    assert got["istio_tcp_connections_opened_total"] == {key(a): 3, key(b): 1}
    assert got["istio_tcp_connections_closed_total"] == {key(a): 3, key(b): 1}
    assert got["istio_tcp_received_bytes_total"] == {key(a): 105, key(b): 42}
    assert got["istio_tcp_sent_bytes_total"] == {key(a): 1007, key(b): 43}


def test_live_byte_updates_add_to_the_totals_reported_at_close():
    m = TcpMetrics()
    a = labels()
    m.opened(a)
    m.transferred(a, received=10, sent=0)
    m.transferred(a, received=0, sent=20)
    assert scrape(m)["istio_tcp_received_bytes_total"] == {key(a): 10}
    m.closed(a, received=1, sent=2)
    got = scrape(m)
    assert got["istio_tcp_received_bytes_total"] == {key(a): 11}
    assert got["istio_tcp_sent_bytes_total"] == {key(a): 22}


def test_sockets_open_goes_up_and_down():
    m = TcpMetrics()
    a = labels()
    m.opened(a)
    m.opened(a)
    assert scrape(m)["istio_tcp_sockets_open"] == {key(a): 2}
    m.closed(a, received=1, sent=1)
    assert scrape(m)["istio_tcp_sockets_open"] == {key(a): 1}
    m.closed(a, received=1, sent=1)
    assert scrape(m)["istio_tcp_sockets_open"] == {key(a): 0}


def test_refused_connections_are_opened_and_closed_with_the_flag():
    m = TcpMetrics()
    ok = labels(reporter="destination")
    denied = labels(reporter="destination", response_flags=ResponseFlags.DENY)
    m.refused(denied)
    m.refused(denied)

    got = scrape(m)
    # As upstream: the open is counted before the flag is known, the close carries it.
    assert got["istio_tcp_connections_opened_total"] == {key(ok): 2}
    assert got["istio_tcp_connections_closed_total"] == {key(denied): 2}
    assert got["istio_tcp_received_bytes_total"] == {key(ok): 0}
    assert got["istio_tcp_sent_bytes_total"] == {key(ok): 0}
    assert got["istio_tcp_sockets_open"] == {key(ok): 0}


def test_a_close_with_a_flag_pairs_with_its_open():
    m = TcpMetrics()
    a = labels()
    m.opened(a)
    m.closed(replace(a, response_flags="CONNECT"), received=3, sent=0)
    got = scrape(m)
    assert got["istio_tcp_sockets_open"] == {key(a): 0}
    assert got["istio_tcp_received_bytes_total"] == {key(a): 3}
    assert got["istio_tcp_connections_closed_total"] == {
        key(replace(a, response_flags="CONNECT")): 1
    }


def test_exposition_has_help_and_type_for_every_family():
    m = TcpMetrics()
    m.opened(labels())
    text = m.render().decode()
    for name, kind in [
        ("istio_tcp_connections_opened", "counter"),
        ("istio_tcp_connections_closed", "counter"),
        ("istio_tcp_received_bytes", "counter"),
        ("istio_tcp_sent_bytes", "counter"),
        ("istio_tcp_sockets_open", "gauge"),
    ]:
        assert f"# HELP {name}" in text
        type_lines = [ln for ln in text.splitlines() if ln.startswith(f"# TYPE {name}")]
        assert type_lines and type_lines[0].endswith(f" {kind}")
    # No `_created` companions: upstream exposes only the counters themselves.
    assert "_created" not in text
    assert TcpMetrics.CONTENT_TYPE.startswith("text/plain; version=0.0.4")


def test_two_instances_share_nothing():
    a, b = TcpMetrics(), TcpMetrics()
    a.opened(labels())
    assert "istio_tcp_connections_opened_total" in scrape(a)
    assert "istio_tcp_connections_opened_total" not in scrape(b)


def test_label_values_are_escaped_in_the_exposition():
    m = TcpMetrics()
    odd = replace(labels(), source_workload='we"ird\\name')
    m.opened(odd)
    assert scrape(m)["istio_tcp_connections_opened_total"] == {key(odd): 1}


def test_negative_byte_counts_are_refused():
    m = TcpMetrics()
    with pytest.raises(ValueError, match="negative"):
        m.closed(labels(), received=-1, sent=0)


# -- several processes, one scrape ----------------------------------------------------------


def test_other_processes_counters_are_summed_into_one_series_each() -> None:
    owner, worker = TcpMetrics(), TcpMetrics()
    a, denied = labels(), labels(response_flags=ResponseFlags.DENY)
    owner.opened(a)
    owner.closed(a, received=10, sent=20)
    worker.opened(a)
    worker.closed(a, received=1, sent=2)
    worker.opened(a)  # still open
    worker.refused(denied)
    worker.hbone_refused("inbound", "tls")
    text = owner.render([worker.export()]).decode()
    samples = {
        (s.name, s.labels.get("response_flags"), s.labels.get("reason")): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }
    assert samples[("istio_tcp_connections_opened_total", "-", None)] == 4  # 1 + 2 + DENY's
    assert samples[("istio_tcp_connections_closed_total", "-", None)] == 2
    assert samples[("istio_tcp_connections_closed_total", "DENY", None)] == 1
    assert samples[("istio_tcp_received_bytes_total", "-", None)] == 11
    assert samples[("istio_tcp_sent_bytes_total", "-", None)] == 22
    assert samples[("istio_tcp_sockets_open", "-", None)] == 1
    assert samples[("hbone_connections_refused_total", None, "tls")] == 1
    # One series per label set: no duplicate lines for the two processes.
    lines = [ln for ln in text.splitlines() if ln and not ln.startswith("#")]
    assert len(lines) == len(set(ln.rsplit(" ", 1)[0] for ln in lines))
    assert owner.render() != text.encode()  # the owner's own counters are untouched


@pytest.mark.parametrize(
    ("export", "why"),
    [
        ({"nonsense": []}, "'nonsense' is not a family"),
        ({"istio_tcp_connections_opened": [["x", 1]]}, r"opened\[0\] is not 23 label values"),
        ({"hbone_connections_refused": [["in", "tls", -1]]}, "is not 2 label values"),
        ({"hbone_connections_refused": [["in", "tls", True]]}, "is not 2 label values"),
    ],
)
def test_a_bad_export_is_refused_whole(export: dict[str, Any], why: str) -> None:
    with pytest.raises(ValueError, match=why):
        TcpMetrics().render([export])
