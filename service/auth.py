"""Bearer-token auth: a token maps to a tenant and scopes; only SHA-256 digests are kept.

A tenant sees only its own resources: lookups filter by tenant and answer 404 for others' ids (a
403 would confirm that the id exists). The `admin` scope grants every scope and sees all tenants.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from jobs.settings import Settings, hash_token
from service.errors import ApiError

bearer = HTTPBearer(auto_error=False, description="an API token configured in ALLOY_TOKENS")


@dataclass(frozen=True)
class Principal:
    tenant: str
    scopes: frozenset[str]

    @property
    def is_admin(self) -> bool:
        return "admin" in self.scopes

    @property
    def tenant_filter(self) -> str | None:
        """The tenant to filter lookups by; None (all tenants) for admins."""
        return None if self.is_admin else self.tenant


def authenticate(settings: Settings, token: str) -> Principal | None:
    digest = hash_token(token)
    found = None
    for entry in settings.tokens:  # compare against every entry: timing does not reveal which matched
        if hmac.compare_digest(entry.sha256, digest):
            found = entry
    return None if found is None else Principal(found.tenant, frozenset(found.scopes))


def require(scope: str):
    def dep(request: Request,
            cred: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> Principal:
        if cred is None or cred.scheme.lower() != "bearer":
            raise ApiError(401, "unauthorized", "send `Authorization: Bearer <token>`",
                           headers={"WWW-Authenticate": "Bearer"})
        p = authenticate(request.app.state.settings, cred.credentials)
        if p is None:
            raise ApiError(401, "unauthorized", "unknown API token", headers={"WWW-Authenticate": "Bearer"})
        if scope not in p.scopes and not p.is_admin:
            raise ApiError(403, "forbidden", f"this token lacks the `{scope}` scope")
        return p

    return dep


Reader = Annotated[Principal, Depends(require("jobs:read"))]
Writer = Annotated[Principal, Depends(require("jobs:write"))]
