"""The small HTTP/1.1 stack: request parsing with limits, a bounded server, a unix-socket client."""
