"""Bearer keys map to tenants; every job belongs to the tenant of the key that created it."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request

from api.errors import APIError
from api.services import services

OPEN_TENANT = "default"


def tenant_for(authorization: str | None, keys: dict[str, str]) -> str:
    """The tenant of the bearer key, checking every key in constant time; raises 401."""
    if not keys:
        return OPEN_TENANT
    scheme, _, token = (authorization or "").partition(" ")
    token = token.strip()
    tenant = None
    if scheme.lower() == "bearer" and token:
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


async def current_tenant(request: Request) -> str:
    return tenant_for(request.headers.get("authorization"), services(request).tenants)


Tenant = Annotated[str, Depends(current_tenant)]
