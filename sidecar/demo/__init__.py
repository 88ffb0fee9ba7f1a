"""Local demo helpers: run Envoy and the sidecar on loopback without touching real providers."""
