"""The fake upstream's account endpoints: Moonshot's token counter and balance, and steers.

`POST /v1/tokenizers/estimate-token-count` counts exactly the prompt tokens the fake reports
in its usage (`prompt_tokens`); `GET /v1/users/me/balance` answers Moonshot's shape. While the
balance is at or below 0, chat completions answer 429 `exceeded_current_quota_error`, as
Moonshot does. `POST /_fake/balance {"available_balance": B, "account_endpoints": bool}` steers
both (without the endpoints, the fake is an OpenAI-style upstream: 404); `/_fake/reset`
restores a positive balance and the endpoints.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from aiohttp import web

if TYPE_CHECKING:
    from moonq.fake_moonshot import FakeConfig

DEFAULT_BALANCE = 100.0
SUSPENDED = (
    "Your account fake-account <ak-fake> is suspended, please check your plan and billing details"
)


@dataclass
class FakeAccount:
    """The account's state and how often its endpoints were called (like `FakeStats`)."""

    available_balance: float = DEFAULT_BALANCE
    account_endpoints: bool = True
    balance_checks: int = 0
    token_estimates: int = 0

    def reset(self) -> None:
        self.available_balance, self.account_endpoints = DEFAULT_BALANCE, True
        self.balance_checks = self.token_estimates = 0


ACCOUNT_KEY = web.AppKey("account", FakeAccount)
_CONFIG_KEY = web.AppKey[Any]("account_config")


def install(app: web.Application, config: FakeConfig) -> None:
    """Add the account's state and routes to the fake's app (`fake_moonshot.create_app`)."""
    app[ACCOUNT_KEY] = FakeAccount()
    app[_CONFIG_KEY] = config
    app.router.add_post("/v1/tokenizers/estimate-token-count", estimate_token_count)
    app.router.add_get("/v1/users/me/balance", balance)
    app.router.add_get("/_fake/balance", get_steer)
    app.router.add_post("/_fake/balance", steer)


def out_of_balance(app: web.Application) -> bool:
    """Whether chat completions are refused for quota now."""
    return app[ACCOUNT_KEY].available_balance <= 0


def prompt_tokens(messages: list[Any]) -> int:
    """The fake's token count of a prompt: a token per 4 characters of text, plus one per
    message (fewer than moonq's cautious local estimate, like a real tokenizer)."""
    return sum(len(_text(m)) for m in messages) // 4 + len(messages)


def _text(message: Any) -> str:
    content = message.get("content") if isinstance(message, dict) else None
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content if isinstance(content, str) else ""


def _error(status: int, kind: str, message: str) -> web.Response:
    return web.json_response({"error": {"type": kind, "message": message}}, status=status)


def _refusal(request: web.Request) -> web.Response | None:
    """404 without the endpoints, 401 for a wrong key (as the chat endpoint checks it)."""
    if not request.app[ACCOUNT_KEY].account_endpoints:
        return _error(404, "resource_not_found_error", "Not found")
    key = request.app[_CONFIG_KEY].api_key
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if key and (scheme.lower() != "bearer" or token.strip() != key):
        return _error(401, "invalid_authentication_error", "Invalid Authentication")
    return None


async def estimate_token_count(request: web.Request) -> web.Response:
    refused = _refusal(request)
    if refused is not None:
        return refused
    request.app[ACCOUNT_KEY].token_estimates += 1
    try:
        body = await request.json()
    except ValueError:
        body = None
    if not isinstance(body, dict) or not isinstance(body.get("model"), str):
        return _error(400, "invalid_request_error", "Invalid request: model is required")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return _error(400, "invalid_request_error", "Invalid request: messages must not be empty")
    return web.json_response({"data": {"total_tokens": prompt_tokens(messages)}})


async def balance(request: web.Request) -> web.Response:
    refused = _refusal(request)
    if refused is not None:
        return refused
    account = request.app[ACCOUNT_KEY]
    account.balance_checks += 1
    amount = account.available_balance
    data = {"available_balance": amount, "voucher_balance": 0, "cash_balance": amount}
    return web.json_response({"code": 0, "data": data, "scode": "0x0", "status": True})


async def get_steer(request: web.Request) -> web.Response:
    return web.json_response(asdict(request.app[ACCOUNT_KEY]))


async def steer(request: web.Request) -> web.Response:
    """`{"available_balance": B}` (a finite number) and/or `{"account_endpoints": bool}`."""
    account = request.app[ACCOUNT_KEY]
    try:
        raw = await request.json()
        amount = float(raw.get("available_balance", account.available_balance))
        endpoints = raw.get("account_endpoints", account.account_endpoints)
    except (ValueError, TypeError, AttributeError):
        return _error(400, "invalid_request_error", "Invalid request: not a balance steer")
    if not math.isfinite(amount) or not isinstance(endpoints, bool):
        return _error(400, "invalid_request_error", "Invalid request: not a balance steer")
    account.available_balance, account.account_endpoints = amount, endpoints
    return web.json_response(asdict(account))
