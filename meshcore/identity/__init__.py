"""SPIFFE identities and workload certificates: the manager, the CA client and the key/CSR
worker process."""
