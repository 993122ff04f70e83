"""The account routes: token exchange, the caller's own usage, and the admin API (``admin`` scope).

Each route parses HTTP and makes one call to :class:`lib.accounts.service.AccountService`, in a
thread when it reaches the database. Responses that carry a credential are marked
``Cache-Control: no-store``.
"""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query, Response

from deployments.routes.deps import Accounts, Authenticated, admit_admin
from lib.accounts.schemas import (
    CleanupRequest,
    CleanupResponse,
    CreatedKeyResponse,
    CreateKeyRequest,
    KeyInfo,
    KeyList,
    TokenResponse,
    UpdateKeyRequest,
    UsageGrouping,
    UsageStatsResponse,
    UsageSummaryResponse,
)

router = APIRouter()

Since = Annotated[
    str | None, Query(max_length=40, description="A duration back from now (7d) or an ISO date.")
]
KeyId = Annotated[
    str, Path(min_length=1, max_length=64, description="The key's id (from `GET /v1/admin/keys`).")
]
ADMIN = [Depends(admit_admin)]


def _no_store(response: Response) -> None:
    # Responses that carry a credential must not be kept by any cache on the way.
    response.headers["Cache-Control"] = "no-store"


@router.post(
    "/v1/auth/token",
    response_model=TokenResponse,
    summary="Exchange the API key in Authorization for a short-lived JWT with its scopes",
)
async def issue_token(response: Response, admission: Authenticated, accounts: Accounts) -> TokenResponse:
    _no_store(response)
    return accounts.issue_token(admission.principal)


@router.get("/v1/usage", response_model=UsageSummaryResponse, summary="The caller's own usage")
async def own_usage(
    admission: Authenticated, accounts: Accounts, since: Since = None
) -> UsageSummaryResponse:
    return await asyncio.to_thread(accounts.own_usage, admission.principal, since)


@router.post(
    "/v1/admin/keys",
    response_model=CreatedKeyResponse,
    status_code=201,
    dependencies=ADMIN,
    summary="Create an API key (the key is in this response only)",
)
async def create_key(body: CreateKeyRequest, response: Response, accounts: Accounts) -> CreatedKeyResponse:
    _no_store(response)
    return await asyncio.to_thread(accounts.create_key, body)


@router.get("/v1/admin/keys", response_model=KeyList, dependencies=ADMIN, summary="List API keys")
async def list_keys(accounts: Accounts, include_revoked: bool = True) -> KeyList:
    return await asyncio.to_thread(accounts.list_keys, include_revoked)


@router.get("/v1/admin/keys/{key_id}", response_model=KeyInfo, dependencies=ADMIN, summary="One key")
async def get_key(key_id: KeyId, accounts: Accounts) -> KeyInfo:
    return await asyncio.to_thread(accounts.get_key, key_id)


@router.patch(
    "/v1/admin/keys/{key_id}",
    response_model=KeyInfo,
    dependencies=ADMIN,
    summary="Change a key's rate limit, compute budget or concurrency cap (null: unlimited)",
)
async def update_key(key_id: KeyId, body: UpdateKeyRequest, accounts: Accounts) -> KeyInfo:
    return await asyncio.to_thread(accounts.update_key, key_id, body)


@router.delete(
    "/v1/admin/keys/{key_id}",
    response_model=KeyInfo,
    dependencies=ADMIN,
    summary="Revoke an API key (every replica refuses it within the key cache TTL)",
)
async def revoke_key(key_id: KeyId, accounts: Accounts) -> KeyInfo:
    return await asyncio.to_thread(accounts.revoke_key, key_id)


@router.get(
    "/v1/admin/usage",
    response_model=UsageStatsResponse,
    dependencies=ADMIN,
    summary="Usage totals grouped by key, endpoint, model or UTC day",
)
async def usage_stats(
    accounts: Accounts, by: UsageGrouping = "key", since: Since = None
) -> UsageStatsResponse:
    return await asyncio.to_thread(accounts.usage_stats, by, since)


@router.get(
    "/v1/admin/usage/summary",
    response_model=UsageSummaryResponse,
    dependencies=ADMIN,
    summary="Usage totals of one key or of all keys",
)
async def usage_summary(
    accounts: Accounts,
    key_id: Annotated[str | None, Query(min_length=1, max_length=64)] = None,
    since: Since = None,
) -> UsageSummaryResponse:
    return await asyncio.to_thread(accounts.usage_summary, key_id, since)


@router.post(
    "/v1/admin/usage/cleanup",
    response_model=CleanupResponse,
    dependencies=ADMIN,
    summary="Delete usage records older than a duration",
)
async def cleanup_usage(body: CleanupRequest, accounts: Accounts) -> CleanupResponse:
    return await asyncio.to_thread(accounts.cleanup_usage, body)
