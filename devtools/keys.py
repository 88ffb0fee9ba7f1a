"""A local stand-in for an Access identity provider: an RSA key, its JWKS, and minted JWTs.

Used by the demo and the tests; production tokens come from the real identity provider.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey


@dataclass
class DevIssuer:
    issuer: str
    audience: str
    key: RSAPrivateKey
    kid: str

    @classmethod
    def generate(
        cls, issuer: str = "https://demo.cloudflareaccess.com", audience: str = "demo-aud"
    ) -> DevIssuer:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        return cls(issuer, audience, key, uuid.uuid4().hex[:16])

    @classmethod
    def load_or_create(
        cls,
        directory: Path,
        issuer: str = "https://demo.cloudflareaccess.com",
        audience: str = "demo-aud",
    ) -> DevIssuer:
        pem_path = directory / "issuer-key.pem"
        if pem_path.exists():
            key = serialization.load_pem_private_key(pem_path.read_bytes(), password=None)
            assert isinstance(key, RSAPrivateKey)
            kid = (directory / "issuer-kid").read_text().strip()
            return cls(issuer, audience, key, kid)
        dev = cls.generate(issuer, audience)
        directory.mkdir(parents=True, exist_ok=True)
        pem_path.write_bytes(
            dev.key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        pem_path.chmod(0o600)
        (directory / "issuer-kid").write_text(dev.kid)
        return dev

    def jwk(self) -> dict[str, Any]:
        data = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self.key.public_key()))
        data.update(kid=self.kid, use="sig", alg="RS256")
        return dict(data)

    def jwks(self, *extra: DevIssuer) -> dict[str, Any]:
        return {"keys": [self.jwk(), *(e.jwk() for e in extra)]}

    def write_jwks(self, path: Path) -> Path:
        path.write_text(json.dumps(self.jwks()))
        return path

    def claims(
        self, email: str, groups: list[str] | None = None, ttl: int = 3600, **extra: Any
    ) -> dict[str, Any]:
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "aud": [self.audience],
            "sub": uuid.uuid5(uuid.NAMESPACE_DNS, email).hex if email else "",
            "email": email,
            "iat": now,
            "nbf": now,
            "exp": now + ttl,
            "type": "app",
            "identity_nonce": uuid.uuid4().hex[:12],
        }
        if groups is not None:
            claims["groups"] = groups
        claims.update(extra)
        return claims

    def mint(
        self, email: str, groups: list[str] | None = None, ttl: int = 3600, **extra: Any
    ) -> str:
        return self.sign(self.claims(email, groups, ttl, **extra))

    def sign(self, claims: dict[str, Any], headers: dict[str, Any] | None = None) -> str:
        return jwt.encode(
            claims, self.key, algorithm="RS256", headers={"kid": self.kid, **(headers or {})}
        )

    def mint_service(self, common_name: str, ttl: int = 3600) -> str:
        """An Access service-token JWT: `common_name` set, `sub` empty."""
        claims = self.claims("", None, ttl, common_name=common_name)
        claims["sub"] = ""
        claims.pop("email")
        return self.sign(claims)
