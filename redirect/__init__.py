"""Traffic capture: the in-pod iptables rules that send an enrolled pod's TCP to its tunnel.

`rules` generates them (pure, iptables-restore text, golden-file tested); `iptables` is the
small privileged module that applies and removes them inside a pod's network namespace.
"""
