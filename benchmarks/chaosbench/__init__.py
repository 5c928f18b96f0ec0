"""The chaos benchmark (`benchmarks/chaos.py`): crashes on purpose under load.

`cluster` (the cluster and its control plane), `targets` (what is killed, how it is
restarted, when it is back), `event` (one kill under load, observed), `load` (the load,
run in the client pod), `app` (the server app), and the pure parts: `pcap` (the node-link
capture read back), `verdict` (outage, recovery, fail-open and stale decisions), `report`
(the table).
"""
