"""The annotation app's HTML: Jinja2 templates with autoescaping (model text is always text, never HTML).

The only script is the inline keyboard handler below, allowed by a per-response CSP nonce; the
Content-Security-Policy forbids every other script, so even an unescaped payload could not run.
"""

from __future__ import annotations

import jinja2

_BASE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{% block title %}rlhf feedback{% endblock %}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style nonce="{{ nonce }}">
body { font-family: system-ui, sans-serif; margin: 1.5rem auto; max-width: 72rem; padding: 0 1rem; color: #222; }
.prompt { background: #f3f3f7; padding: .8rem 1rem; border-radius: 6px; white-space: pre-wrap; }
.pair { display: grid; grid-template-columns: 1fr 1fr; gap: 1rem; margin: 1rem 0; }
.resp { border: 1px solid #ccc; border-radius: 6px; padding: .8rem 1rem; white-space: pre-wrap; min-height: 6rem; }
.resp h3 { margin-top: 0; }
.choices button { font-size: 1rem; padding: .5rem .9rem; margin: .2rem; border-radius: 6px; border: 1px solid #888;
  background: #fff; cursor: pointer; }
.choices button.current { background: #dde8ff; border-color: #3060c0; }
kbd { border: 1px solid #aaa; border-bottom-width: 2px; border-radius: 3px; padding: 0 .3rem; font-size: .85rem; }
.meta { color: #666; font-size: .9rem; }
textarea { width: 100%; box-sizing: border-box; }
table { border-collapse: collapse; } td, th { border: 1px solid #ccc; padding: .3rem .6rem; text-align: left; }
</style></head><body>
{% block body %}{% endblock %}
</body></html>
"""

_LOGIN = """{% extends "base" %}{% block body %}
<h1>Sign in to label</h1>
{% if error %}<p role="alert">{{ error }}</p>{% endif %}
<form method="post" action="/login">
<label>Access token <input name="token" type="password" autocomplete="off" autofocus></label>
<button type="submit">Sign in</button></form>
<p class="meta">Ask the team lead for a token (<code>rlhf feedback add-annotator NAME</code>).</p>
{% endblock %}"""

_ITEM = """{% extends "base" %}{% block title %}Item {{ n }} of {{ total }}{% endblock %}{% block body %}
<p class="meta">Signed in as <b>{{ annotator }}</b> · <span id="progress">item {{ n }} of {{ total }}</span>
 · {{ done }} labelled{% if prev %} · <a id="prev" href="/label/{{ prev.batch_id }}/{{ prev.item_id }}">&larr;
 previous <kbd>Backspace</kbd></a>{% endif %}</p>
<h2>Prompt</h2>
<div class="prompt" id="prompt">{{ prompt }}</div>
<div class="pair">
  <div class="resp"><h3>Response A</h3><div id="response-a">{{ left }}</div></div>
  <div class="resp"><h3>Response B</h3><div id="response-b">{{ right }}</div></div>
</div>
<form method="post" action="/label/{{ batch_id }}/{{ item_id }}" id="label-form">
<input type="hidden" name="csrf" value="{{ csrf }}">
<input type="hidden" name="shown_at" value="{{ shown_at }}">
<div class="choices">
{% for value, text, key in buttons %}<button type="submit" name="choice" value="{{ value }}"
  {% if value == current %}class="current"{% endif %}>{{ text }} <kbd>{{ key }}</kbd></button>
{% endfor %}</div>
<p><label>Reason (optional)<br><textarea name="reason" rows="2" maxlength="{{ max_reason }}">{{ reason }}</textarea>
</label></p></form>
<p class="meta">Keys: <kbd>1</kbd> A better · <kbd>2</kbd> B better · <kbd>3</kbd> tie · <kbd>4</kbd> both bad ·
<kbd>Space</kbd> skip{% if prev %} · <kbd>Backspace</kbd> previous{% endif %} (not while typing a reason)</p>
<script nonce="{{ nonce }}">
document.addEventListener("keydown", function (e) {
  if (e.target.tagName === "TEXTAREA" || e.target.tagName === "INPUT" || e.ctrlKey || e.metaKey || e.altKey) return;
  var keys = {"1": "left", "2": "right", "3": "tie", "4": "both_bad", " ": "skip"};
  if (e.key in keys) {
    e.preventDefault();
    document.querySelector('button[name="choice"][value="' + keys[e.key] + '"]').click();
  } else if (e.key === "Backspace") {
    var prev = document.getElementById("prev");
    if (prev) { e.preventDefault(); window.location.href = prev.href; }
  }
});
</script>
{% endblock %}"""

_DONE = """{% extends "base" %}{% block body %}
<h1 id="done">All done</h1><p>Thank you, {{ annotator }}: nothing left for you to label ({{ done }} labels).</p>
{% if prev %}<p><a id="prev" href="/label/{{ prev.batch_id }}/{{ prev.item_id }}">&larr; review your last label</a>
</p>{% endif %}{% endblock %}"""

_ADMIN = """{% extends "base" %}{% block title %}Progress{% endblock %}{% block body %}
<h1>Labelling progress</h1>
<p>Batches: {% for b in batches %}<code>{{ b }}</code> {% endfor %} · items: {{ items }} · overlap: {{ overlap }}
 · labels: {{ labels }} of {{ items * overlap }}</p>
<table><tr><th>annotator</th><th>labels</th><th>skips</th><th>seconds per label</th></tr>
{% for r in per_annotator %}<tr><td>{{ r.annotator }}</td><td>{{ r.n }}</td><td>{{ r.skips }}</td>
<td>{{ "%.1f"|format(r.secs or 0) }}</td></tr>{% endfor %}</table>
<h2>Agreement on items labelled more than once</h2>
<p>{% if agreement.n_items %}{{ agreement.n_items }} items, {{ agreement.n_pairs }} annotator pairs: percent agreement
{{ "%.2f"|format(agreement.percent) }}, Cohen's kappa {{ "%.2f"|format(agreement.kappa) }}{% else %}no item has two
labels yet (set <code>feedback.overlap</code> to 2 or more){% endif %}</p>
{% endblock %}"""

_ERROR = """{% extends "base" %}{% block body %}<h1>{{ title }}</h1><p role="alert">{{ message }}</p>
<p><a href="/">back</a></p>{% endblock %}"""

ENV = jinja2.Environment(
    loader=jinja2.DictLoader({"base": _BASE, "login": _LOGIN, "item": _ITEM, "done": _DONE, "admin": _ADMIN,
                              "error": _ERROR}),
    autoescape=True, undefined=jinja2.StrictUndefined)


def render(name: str, **context) -> str:
    return ENV.get_template(name).render(**context)


__all__ = ["render"]
