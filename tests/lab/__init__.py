"""A real-NAT lab for the tests: network namespaces, veth pairs and nftables (see README.md)."""
