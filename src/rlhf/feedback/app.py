"""The annotation app (FastAPI, server-rendered HTML): `rlhf feedback serve BATCH...`.

Security model:

* every request that reads or writes labels needs an annotator token (the ``rlhf_token`` cookie
  set by ``POST /login``, or ``Authorization: Bearer <token>`` for scripts); unknown tokens get 401/403;
* every write (``POST /label/...``) also needs the annotator's CSRF token (an HMAC of their name
  with the store's secret, a hidden form field); the cookie is ``HttpOnly`` and ``SameSite=Strict``;
* request bodies over ``feedback.max_body_bytes`` are refused (413) before they are read in full;
* pages are Jinja2 with autoescaping, and a Content-Security-Policy that allows only the page's
  own nonce'd keyboard script: model text is shown as text and cannot run anything;
* ``rlhf feedback serve`` binds 127.0.0.1 unless ``--host`` says otherwise.

JSON for scripts (the simulated annotators): ``GET /api/next`` gives the next item as shown
(``left``/``right``) with the CSRF token; the label goes through the same ``POST /label/...``.
"""

from __future__ import annotations

import hmac
import secrets
import time
from typing import Any
from urllib.parse import parse_qs

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

from rlhf.errors import UserError
from rlhf.feedback import agreement, pages
from rlhf.feedback.store import CHOICES, Store

COOKIE = "rlhf_token"
BUTTONS = [("left", "A is better", "1"), ("right", "B is better", "2"), ("tie", "Tie", "3"),
           ("both_bad", "Both bad", "4"), ("skip", "Skip", "Space")]


class BodyLimit:
    """ASGI middleware: refuse request bodies larger than ``limit`` bytes (413), declared or streamed."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            return await _too_large(send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge()
            return message
        try:
            await self.app(scope, limited, send)
        except _TooLarge:
            await _too_large(send)


class _TooLarge(Exception):
    pass


async def _too_large(send):
    await send({"type": "http.response.start", "status": 413, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"request body too large"})


def create_app(store: Store, batches: list, cfg) -> FastAPI:
    """The app over ``store`` serving ``batches`` (loaded :class:`rlhf.feedback.batch.Batch` objects)."""
    for b in batches:
        store.add_batch(b)
    batch_ids = [b.batch_id for b in batches]
    app = FastAPI(title="rlhf feedback", docs_url=None, redoc_url=None, openapi_url=None)

    def page(name: str, status: int = 200, **ctx) -> HTMLResponse:
        nonce = secrets.token_urlsafe(16)
        html = pages.render(name, nonce=nonce, **ctx)
        return HTMLResponse(html, status_code=status, headers={
            "Content-Security-Policy": f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; "
                                       "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
            "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "Cache-Control": "no-store"})

    def who(request: Request) -> dict[str, Any] | None:
        auth = request.headers.get("authorization", "")
        token = auth[7:] if auth.lower().startswith("bearer ") else request.cookies.get(COOKIE)
        return store.annotator_for(token)

    async def form(request: Request) -> dict[str, str]:
        body = (await request.body()).decode("utf-8", errors="replace")
        return {k: v[0] for k, v in parse_qs(body, keep_blank_values=True).items()}

    def error(status: int, title: str, message: str, request: Request):
        if "text/html" in request.headers.get("accept", ""):
            return page("error", status, title=title, message=message)
        return JSONResponse({"error": message}, status_code=status)

    @app.middleware("http")
    async def no_cache(request: Request, call_next):
        response = await call_next(request)
        response.headers.setdefault("Cache-Control", "no-store")
        return response

    @app.get("/healthz")
    def healthz():
        return {"ok": True, "batches": batch_ids}

    @app.get("/")
    def index(request: Request):
        if who(request):
            return RedirectResponse("/label", status_code=303)
        return page("login", error=None)

    @app.post("/login")
    async def login(request: Request):
        token = (await form(request)).get("token", "").strip()
        user = store.annotator_for(token)
        if user is None:
            return page("login", 403, error="unknown token")
        resp = RedirectResponse("/admin" if user["admin"] else "/label", status_code=303)
        resp.set_cookie(COOKIE, token, httponly=True, samesite="strict", secure=cfg.cookie_secure,
                        max_age=30 * 24 * 3600)
        return resp

    @app.post("/logout")
    def logout():
        resp = RedirectResponse("/", status_code=303)
        resp.delete_cookie(COOKIE)
        return resp

    def show(user: dict, a: dict) -> dict[str, Any]:
        it = store.item(a["batch_id"], a["item_id"])
        left, right = (it["response_b"], it["response_a"]) if a["flipped"] else (it["response_a"], it["response_b"])
        return {"batch_id": a["batch_id"], "item_id": a["item_id"], "prompt": it["prompt"], "left": left,
                "right": right, "n": a["n"], "total": store.n_items(batch_ids),
                "csrf": store.csrf_token(user["name"])}

    @app.get("/label")
    def next_page(request: Request):
        user = who(request)
        if user is None:
            return RedirectResponse("/", status_code=303)
        a = store.next_item(user["name"], batch_ids, cfg.overlap)
        if a is None:
            done = len([r for r in store.labels(batch_ids) if r["annotator"] == user["name"]])
            return page("done", annotator=user["name"], done=done,
                        prev=store.previous(user["name"], 10**9, batch_ids))
        return RedirectResponse(f"/label/{a['batch_id']}/{a['item_id']}", status_code=303)

    @app.get("/label/{batch_id}/{item_id}")
    def item_page(batch_id: str, item_id: str, request: Request):
        user = who(request)
        if user is None:
            return RedirectResponse("/", status_code=303)
        a = store.assignment(user["name"], batch_id, item_id)
        if a is None or batch_id not in batch_ids:
            return error(404, "Not yours", "this item is not assigned to you", request)
        current = store.label(user["name"], batch_id, item_id) or {}
        done = len([r for r in store.labels(batch_ids) if r["annotator"] == user["name"]])
        return page("item", annotator=user["name"], shown_at=f"{time.time():.3f}", buttons=BUTTONS,
                    current=current.get("choice"), reason=current.get("reason", ""), done=done,
                    prev=store.previous(user["name"], a["n"], batch_ids), max_reason=cfg.max_reason_chars,
                    **show(user, a))

    @app.get("/api/next")
    def api_next(request: Request):
        user = who(request)
        if user is None:
            return JSONResponse({"error": "unknown or missing token"}, status_code=401)
        a = store.next_item(user["name"], batch_ids, cfg.overlap)
        return {"done": True} if a is None else {"done": False, **show(user, a)}

    @app.post("/label/{batch_id}/{item_id}")
    async def put_label(batch_id: str, item_id: str, request: Request):
        user = who(request)
        if user is None:
            return error(401, "Not signed in", "unknown or missing token: nothing was stored", request)
        f = await form(request)
        if not hmac.compare_digest(f.get("csrf", ""), store.csrf_token(user["name"])):
            return error(403, "Refused", "missing or wrong CSRF token: nothing was stored", request)
        choice = f.get("choice", "")
        if choice not in CHOICES:
            return error(400, "Refused", f"choice must be one of {', '.join(CHOICES)}", request)
        try:
            seconds = max(0.0, time.time() - float(f.get("shown_at", "")))
        except ValueError:
            seconds = None
        try:
            store.put_label(user["name"], batch_id, item_id, choice, f.get("reason", "")[: cfg.max_reason_chars],
                            seconds)
        except UserError as e:
            return error(404, "Refused", e.one_line(), request)
        if "application/json" in request.headers.get("accept", ""):
            return {"stored": True}
        return RedirectResponse("/label", status_code=303)

    @app.get("/admin")
    def admin(request: Request):
        user = who(request)
        if user is None or not user["admin"]:
            return error(403, "Admins only", "this page needs an admin token (add-annotator --admin)", request)
        prog = store.progress(batch_ids)
        return page("admin", batches=batch_ids, overlap=cfg.overlap, agreement=agreement.agreement(
            store.labels(batch_ids)), **prog)

    @app.exception_handler(404)
    async def not_found(request: Request, exc):
        return Response("not found", status_code=404, media_type="text/plain")

    return BodyLimit(app, cfg.max_body_bytes)


def serve(store: Store, batches: list, cfg, *, host: str, port: int) -> None:
    import uvicorn

    uvicorn.run(create_app(store, batches, cfg), host=host, port=port, log_level="warning",
                h11_max_incomplete_event_size=cfg.max_body_bytes)


__all__ = ["create_app", "serve", "COOKIE"]
