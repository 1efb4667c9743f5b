"""`rlhf feedback simulate`: the demo's Bradley-Terry gold annotators label a batch through the app's HTTP API.

Each simulated annotator (``sim-01`` ... with the temperatures of :data:`rlhf.data.demo.ANNOTATORS`)
gets a real token, then, in its own thread, asks ``GET /api/next`` and answers with ``POST
/label/...`` exactly as a browser form does (token, CSRF token): ``left`` with probability
``sigmoid((gold(left) - gold(right)) / T)``, else ``right``; a tie when both gold scores are equal.
Without ``url`` the app is started on a free 127.0.0.1 port for the duration (a real uvicorn server).
"""

from __future__ import annotations

import contextlib
import json
import random
import socket
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import Any

from rlhf.data import demo
from rlhf.errors import UserError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_app(asgi_app, port: int | None = None) -> Iterator[str]:
    """Serve ``asgi_app`` with uvicorn on 127.0.0.1 in a thread; yields its base URL."""
    import uvicorn

    port = port or free_port()
    server = uvicorn.Server(uvicorn.Config(asgi_app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise UserError(f"the annotation app did not start on 127.0.0.1:{port}")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def _call(url: str, token: str, data: dict[str, str] | None = None) -> dict[str, Any]:
    body = urllib.parse.urlencode(data).encode() if data is not None else None
    req = urllib.request.Request(url, data=body, headers={"Authorization": f"Bearer {token}",
                                                          "Accept": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


def annotate(base_url: str, name: str, token: str, temperature: float, seed: int) -> int:
    """Label until the app says done; returns how many labels were given."""
    rng = random.Random(f"{seed}:{name}")
    n = 0
    while True:
        item = _call(f"{base_url}/api/next", token)
        if item.get("done"):
            return n
        gl, gr = demo.gold_score(item["prompt"], item["left"]), demo.gold_score(item["prompt"], item["right"])
        choice = "tie" if gl == gr else ("left" if rng.random() < demo.bt_prob(gl, gr, temperature) else "right")
        _call(f"{base_url}/label/{item['batch_id']}/{item['item_id']}", token,
              {"csrf": item["csrf"], "choice": choice, "reason": "", "shown_at": f"{time.time():.3f}"})
        n += 1


def simulate(base_url: str, tokens: dict[str, str], *, seed: int = 0) -> dict[str, int]:
    """Run the annotators in ``tokens`` (name -> token) in parallel threads; labels per annotator."""
    results: dict[str, int] = {}
    errors: list[BaseException] = []

    def work(name: str, token: str):
        try:
            results[name] = annotate(base_url, name, token, demo.ANNOTATORS.get(name, 0.6), seed)
        except BaseException as e:  # reported below, after every thread ended
            errors.append(e)
    threads = [threading.Thread(target=work, args=item) for item in tokens.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise UserError(f"a simulated annotator failed: {errors[0]}")
    return dict(sorted(results.items()))


def sim_names(n: int) -> list[str]:
    names = list(demo.ANNOTATORS)
    if not 1 <= n <= len(names):
        raise UserError(f"--annotators must be 1 to {len(names)} (the demo's simulated annotators)")
    return names[:n]


__all__ = ["simulate", "annotate", "running_app", "free_port", "sim_names"]
