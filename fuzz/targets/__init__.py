"""One module per parser under fuzz: each has `test_one_input(data)`, which raises nothing
for any input (the parser's documented errors are caught inside: they are the right answer
to bad input), and `seeds()`, real messages built by the project's own encoders."""

# Every target, in the order `make fuzz` runs them.
TARGETS = (
    "h2_connection",
    "hpack_blocks",
    "connect_headers",
    "zds_codec",
    "mesh_config",
    "policy",
    "routes",
    "l7config",
    "http1_node",
    "waypoint_http",
    "waypoint_h2",
    "dns_message",
    "xds_wire",
    "ca_messages",
    "admission_review",
)
