"""The fake upstream's `GET /v1/models`: Moonshot's model ids, in Moonshot's list shape (OpenAI's
plus `root`, `parent` and `permission`), behind the fake's key check; it counts its calls."""

from __future__ import annotations

from dataclasses import dataclass, field

from aiohttp import web

from moonq.fake_moonshot import CONFIG_KEY, _ApiError, _check_auth, _error_response

# Moonshot's models (MOONSHOT.md); `created` is a fixed date, so answers are reproducible.
MODEL_IDS = (
    "kimi-k2.6",
    "kimi-k2.5",
    "kimi-k2-0905-preview",
    "kimi-k2-turbo-preview",
    "kimi-k2-thinking",
    "kimi-k2-thinking-turbo",
    "moonshot-v1-8k",
    "moonshot-v1-32k",
    "moonshot-v1-128k",
    "moonshot-v1-auto",
    "moonshot-v1-8k-vision-preview",
    "moonshot-v1-32k-vision-preview",
    "moonshot-v1-128k-vision-preview",
)
CREATED = 1_711_929_600


@dataclass
class FakeModels:
    """The ids the fake lists (tests may change them) and how often it was asked."""

    ids: list[str] = field(default_factory=lambda: list(MODEL_IDS))
    calls: int = 0


MODELS_KEY = web.AppKey("models", FakeModels)


def install(app: web.Application) -> None:
    """Add the model list to the fake's app (`fake_moonshot.create_app`)."""
    app[MODELS_KEY] = FakeModels()
    app.router.add_get("/v1/models", list_models)


def _model(model_id: str) -> dict[str, object]:
    return {
        "id": model_id,
        "object": "model",
        "created": CREATED,
        "owned_by": "moonshot",
        "root": model_id,
        "parent": None,
        "permission": [{"id": f"perm-{model_id}", "object": "model_permission"}],
    }


async def list_models(request: web.Request) -> web.Response:
    models = request.app[MODELS_KEY]
    models.calls += 1
    try:
        _check_auth(request, request.app[CONFIG_KEY])
    except _ApiError as exc:
        return _error_response(exc)
    return web.json_response({"object": "list", "data": [_model(i) for i in models.ids]})
