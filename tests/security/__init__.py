"""Reproductions of attacks on the sidecar, each kept as a test once it is fixed."""
