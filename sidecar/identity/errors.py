"""Why a credential was refused: stable reason codes, reused in bodies, logs and metrics."""

from __future__ import annotations


class AuthError(Exception):
    """A presented credential that does not identify anyone. `code` is the public reason."""

    def __init__(self, code: str, detail: str = "") -> None:
        self.code = code
        self.detail = detail or code.replace("_", " ")
        super().__init__(f"{code}: {self.detail}")
