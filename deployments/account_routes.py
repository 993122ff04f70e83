"""The account routes of the ingress: token exchange, own usage, and the admin API (``admin`` scope).

Each route parses HTTP and makes one call to :class:`lib.accounts.service.AccountService`, in a
thread when it reaches the database.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from fastapi import Depends, FastAPI, Path, Query, Response

from lib.accounts.gate import Admission
from lib.accounts.records import Scope
from lib.accounts.schemas import (
    CleanupRequest,
    CleanupResponse,
    CreatedKeyResponse,
    CreateKeyRequest,
    KeyInfo,
    KeyList,
    TokenResponse,
    UsageGrouping,
    UsageStatsResponse,
    UsageSummaryResponse,
)
from lib.accounts.service import AccountService

# Builds the dependency that admits a request needing a scope (None: any authenticated caller).
AdmissionDependency = Callable[[Scope | None], Callable[..., Awaitable[Admission]]]

SINCE = Query(None, max_length=40, description="A duration back from now (7d) or an ISO date.")
KEY_ID = Path(min_length=1, max_length=64, description="The key's id (from `GET /v1/admin/keys`).")


def _no_store(response: Response) -> None:
    # Responses that carry a credential must not be kept by any cache on the way.
    response.headers["Cache-Control"] = "no-store"


def add_account_routes(api: FastAPI, accounts: AccountService, admitted: AdmissionDependency) -> None:
    anyone = Depends(admitted(None))
    admin = Depends(admitted(Scope.ADMIN))

    @api.post(
        "/v1/auth/token",
        response_model=TokenResponse,
        summary="Exchange the API key in Authorization for a short-lived JWT with its scopes",
    )
    async def issue_token(response: Response, admission: Admission = anyone) -> TokenResponse:
        _no_store(response)
        return accounts.issue_token(admission.principal)

    @api.get("/v1/usage", response_model=UsageSummaryResponse, summary="The caller's own usage")
    async def own_usage(since: str | None = SINCE, admission: Admission = anyone) -> UsageSummaryResponse:
        return await asyncio.to_thread(accounts.own_usage, admission.principal, since)

    @api.post(
        "/v1/admin/keys",
        response_model=CreatedKeyResponse,
        status_code=201,
        dependencies=[admin],
        summary="Create an API key (the key is in this response only)",
    )
    async def create_key(body: CreateKeyRequest, response: Response) -> CreatedKeyResponse:
        _no_store(response)
        return await asyncio.to_thread(accounts.create_key, body)

    @api.get("/v1/admin/keys", response_model=KeyList, dependencies=[admin], summary="List API keys")
    async def list_keys(include_revoked: bool = True) -> KeyList:
        return await asyncio.to_thread(accounts.list_keys, include_revoked)

    @api.get("/v1/admin/keys/{key_id}", response_model=KeyInfo, dependencies=[admin], summary="One key")
    async def get_key(key_id: str = KEY_ID) -> KeyInfo:
        return await asyncio.to_thread(accounts.get_key, key_id)

    @api.delete(
        "/v1/admin/keys/{key_id}",
        response_model=KeyInfo,
        dependencies=[admin],
        summary="Revoke an API key (every replica refuses it within the key cache TTL)",
    )
    async def revoke_key(key_id: str = KEY_ID) -> KeyInfo:
        return await asyncio.to_thread(accounts.revoke_key, key_id)

    @api.get(
        "/v1/admin/usage",
        response_model=UsageStatsResponse,
        dependencies=[admin],
        summary="Usage totals grouped by key, endpoint, model or UTC day",
    )
    async def usage_stats(by: UsageGrouping = "key", since: str | None = SINCE) -> UsageStatsResponse:
        return await asyncio.to_thread(accounts.usage_stats, by, since)

    @api.get(
        "/v1/admin/usage/summary",
        response_model=UsageSummaryResponse,
        dependencies=[admin],
        summary="Usage totals of one key or of all keys",
    )
    async def usage_summary(
        key_id: str | None = Query(None, min_length=1, max_length=64), since: str | None = SINCE
    ) -> UsageSummaryResponse:
        return await asyncio.to_thread(accounts.usage_summary, key_id, since)

    @api.post(
        "/v1/admin/usage/cleanup",
        response_model=CleanupResponse,
        dependencies=[admin],
        summary="Delete usage records older than a duration",
    )
    async def cleanup_usage(body: CleanupRequest) -> CleanupResponse:
        return await asyncio.to_thread(accounts.cleanup_usage, body)
