"""The dependencies of the ingress routes: admission per scope, and the collaborators they call.

Admission (:func:`admit`) authenticates the ``Authorization`` header, counts the request against
the caller's rate limit and attaches the admission to the request *before* enforcing the limit
and the scope, so that a 429 or 403 carries the rate-limit headers and is recorded as usage like
any other answered request (``lib/http/gate.py``). It runs before the body is validated.

The collaborators are put on ``app.state`` by ``deployments/ingress.py`` (:data:`STATE_GATE` ...).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from deployments.model_clients import ModelClients
from deployments.model_loader import NodeLoader
from lib.accounts.gate import Admission, RequestGate
from lib.accounts.records import Scope
from lib.accounts.service import AccountService
from lib.http.gate import attach_admission, principal_of

# Names of the collaborators on app.state.
STATE_GATE = "gate"
STATE_ACCOUNTS = "accounts"
STATE_MODELS = "models"
STATE_LOADER = "loader"


async def admit(request: Request, scope: Scope | None) -> Admission:
    """Authenticate and rate-limit the request, then enforce the limit and ``scope`` (None: any)."""
    gate: RequestGate = getattr(request.app.state, STATE_GATE)
    admission = await gate.admit(request.headers.get("authorization"), principal_of(request.scope))
    attach_admission(request.scope, admission)
    admission.require(scope)
    return admission


async def admit_infer(request: Request) -> Admission:
    return await admit(request, Scope.INFER)


async def admit_classify(request: Request) -> Admission:
    return await admit(request, Scope.CLASSIFY)


async def admit_admin(request: Request) -> Admission:
    return await admit(request, Scope.ADMIN)


async def admit_any(request: Request) -> Admission:
    return await admit(request, None)


async def account_service(request: Request) -> AccountService:
    service: AccountService = getattr(request.app.state, STATE_ACCOUNTS)
    return service


async def model_clients(request: Request) -> ModelClients:
    clients: ModelClients = getattr(request.app.state, STATE_MODELS)
    return clients


async def node_loader(request: Request) -> NodeLoader:
    loader: NodeLoader = getattr(request.app.state, STATE_LOADER)
    return loader


# A caller admitted with the scope (``Authenticated``: any valid credential). Routes that need
# the admin scope but not the admission list ``Depends(admit_admin)`` in their ``dependencies``.
AdmittedInfer = Annotated[Admission, Depends(admit_infer)]
AdmittedClassify = Annotated[Admission, Depends(admit_classify)]
Authenticated = Annotated[Admission, Depends(admit_any)]

Accounts = Annotated[AccountService, Depends(account_service)]
Models = Annotated[ModelClients, Depends(model_clients)]
Loader = Annotated[NodeLoader, Depends(node_loader)]
