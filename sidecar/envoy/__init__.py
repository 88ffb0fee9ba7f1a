"""Envoy transports: ext_authz and ext_proc servicers over grpc.aio; they only translate."""
