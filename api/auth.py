"""Bearer keys map to tenants; every job belongs to the tenant of the key that created it."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from api.errors import APIError
from api.services import services

OPEN_TENANT = "default"

# Declares the scheme to OpenAPI (so /docs's "Authorize" sends the key); the check is ours, so
# a missing key is our 401, not FastAPI's 403.
bearer = HTTPBearer(
    auto_error=False,
    description="A key of MOONQ_API_KEYS: `Authorization: Bearer <key>`. It names the tenant "
    "whose jobs, files and batches a request sees. With MOONQ_API_KEYS empty, none is needed.",
)


def tenant_for(token: str | None, keys: dict[str, str]) -> str:
    """The tenant of the bearer token, checking every key in constant time; raises 401."""
    if not keys:
        return OPEN_TENANT
    token = (token or "").strip()
    tenant = None
    if token:
        for key, name in keys.items():
            if hmac.compare_digest(key.encode(), token.encode()):
                tenant = name
    if tenant is None:
        raise APIError(
            401,
            "Missing or invalid API key: send 'Authorization: Bearer <key>'.",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return tenant


async def current_tenant(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)],
) -> str:
    token = credentials.credentials if credentials is not None else None
    return tenant_for(token, services(request).tenants)


Tenant = Annotated[str, Depends(current_tenant)]
