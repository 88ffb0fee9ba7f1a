"""Static group grants (`identity.directory`): which groups a person signed in by which
issuer gets on top of the groups their token carries.

A grant names an e-mail address, and an address is only as trustworthy as whoever signed it:
with several issuers, any one of them could assert `alice@example.com`. So a grant is keyed
by issuer as well as address, and applies only to people (kind `user`) signed in by a
configured identity provider. Never to Access service tokens or sidecar service tokens,
which name no person, and never to the sidecar's own device-login tokens: those carry the
approver's groups, this directory's included, as they were when the login was approved.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from sidecar.model import normalise_email


@dataclass(frozen=True)
class Directory:
    # (issuer, normalised e-mail) → groups granted.
    grants: Mapping[tuple[str, str], tuple[str, ...]] = field(default_factory=dict)

    def groups_for(self, issuer: str, email: str) -> tuple[str, ...]:
        if not email or not self.grants:
            return ()
        return self.grants.get((issuer, normalise_email(email)), ())

    @classmethod
    def build(cls, entries: Iterable[tuple[str, str, str]]) -> Directory:
        """From (group, issuer, e-mail) entries."""
        grants: dict[tuple[str, str], list[str]] = {}
        for group, issuer, email in entries:
            groups = grants.setdefault((issuer, normalise_email(email)), [])
            if group not in groups:
                groups.append(group)
        return cls({key: tuple(value) for key, value in grants.items()})

    @classmethod
    def for_issuers(
        cls, by_email: Mapping[str, tuple[str, ...]], issuers: Iterable[str]
    ) -> Directory:
        """Grants by e-mail alone, meant for every one of `issuers`."""
        names = tuple(issuers)
        return cls.build(
            (group, issuer, email)
            for email, groups in by_email.items()
            for group in groups
            for issuer in names
        )
