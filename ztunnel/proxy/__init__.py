"""The three capture listeners of a pod: outbound (15001), inbound HBONE (15008) and
inbound plaintext (15006). Each decides first (a frozen decision), then does the I/O."""
