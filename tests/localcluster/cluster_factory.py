"""The 2-node, 3-pod cluster used by the netns tests, as cluster-file text."""

from __future__ import annotations

import secrets

APP_PORT = 8080


def random_cluster_name() -> str:
    return "t" + secrets.token_hex(3)  # 7 chars, within the 10-char limit


def cluster_yaml(name: str) -> str:
    return f"""
name: {name}
nodes:
  - name: node1
  - name: node2
namespaces:
  - name: travel
    labels: {{istio.io/dataplane-mode: ambient}}
pods:
  - name: client-0
    namespace: travel
    labels: {{app: client}}
    node: node1
    command: ["{{python}}", "echo_server.py", "{APP_PORT}"]
  - name: echo-0
    namespace: travel
    labels: {{app: echo}}
    node: node1
    command: ["{{python}}", "echo_server.py", "{APP_PORT}"]
  - name: echo-1
    namespace: travel
    labels: {{app: echo}}
    node: node2
    command: ["{{python}}", "echo_server.py", "{APP_PORT}"]
services:
  - name: echo
    namespace: travel
    selector: {{app: echo}}
    ports: [{{port: 80, targetPort: {APP_PORT}, name: tcp}}]
"""
