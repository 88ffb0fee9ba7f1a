"""Who is calling: Access-style JWTs, sidecar-issued service tokens, device-login tokens."""
