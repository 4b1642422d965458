"""The login page of `preflab serve --auth`, served at GET /login (annotate/web/session_guard.py).

gradio's own login form says "Incorrect credentials" whatever went wrong; this page
posts to the same POST /login and shows the server's own answer, so a locked-out
annotator reads "too many failed logins ...; try again in 32 s". The page is static
apart from the admin's login message (escaped); its script runs under a CSP nonce
and nothing may frame it (clickjacking).
"""

from __future__ import annotations

import html
import secrets

_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>preflab: log in</title>
<style>
  body {{ font-family: system-ui, sans-serif; background: #f6f7f9; margin: 0; }}
  main {{ max-width: 22rem; margin: 12vh auto; background: #fff; padding: 2rem;
         border-radius: 12px; box-shadow: 0 1px 4px rgba(0,0,0,.12); }}
  h1 {{ font-size: 1.3rem; margin: 0 0 .5rem; }}
  p.message {{ color: #444; margin: 0 0 1.2rem; }}
  label {{ display: block; font-size: .9rem; margin: .8rem 0 .3rem; }}
  input {{ width: 100%; box-sizing: border-box; padding: .55rem; font-size: 1rem;
          border: 1px solid #bbb; border-radius: 6px; }}
  button {{ margin-top: 1.3rem; width: 100%; padding: .6rem; font-size: 1rem;
           border: 0; border-radius: 6px; background: #ea580c; color: #fff; cursor: pointer; }}
  button:disabled {{ opacity: .6; cursor: wait; }}
  #error {{ color: #b91c1c; min-height: 1.3em; margin: .9rem 0 0; }}
</style>
</head>
<body>
<main>
  <h1>preflab</h1>
  <p class="message">{message}</p>
  <form id="login">
    <label for="username">Name</label>
    <input id="username" name="username" type="text" autocomplete="username" required autofocus>
    <label for="password">Password</label>
    <input id="password" name="password" type="password" autocomplete="current-password" required>
    <button type="submit">Login</button>
    <p id="error" role="alert"></p>
  </form>
</main>
<script nonce="{nonce}">
  const form = document.getElementById("login");
  const error = document.getElementById("error");
  form.addEventListener("submit", async (event) => {{
    event.preventDefault();
    const button = form.querySelector("button");
    button.disabled = true;
    error.textContent = "";
    try {{
      const answer = await fetch("login", {{
        method: "POST",
        body: new URLSearchParams(new FormData(form)),
        credentials: "same-origin",
      }});
      if (answer.ok) {{ window.location.href = "./"; return; }}
      let detail = "";
      try {{ detail = (await answer.json()).detail; }} catch (e) {{}}
      error.textContent = typeof detail === "string" && detail ? detail : "login failed (" + answer.status + ")";
    }} catch (e) {{
      error.textContent = "the server cannot be reached; try again in a moment";
    }} finally {{
      button.disabled = false;
    }}
  }});
</script>
</body>
</html>
"""


def login_page(message: str) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """The page's body and its response headers."""
    nonce = secrets.token_urlsafe(16)
    body = _PAGE.format(message=html.escape(message), nonce=nonce).encode("utf-8")
    headers = [
        (b"content-type", b"text/html; charset=utf-8"),
        (b"content-length", str(len(body)).encode()),
        (b"cache-control", b"no-store"),
        (b"x-frame-options", b"DENY"),
        (
            b"content-security-policy",
            f"default-src 'self'; script-src 'nonce-{nonce}'; style-src 'unsafe-inline'; "
            "frame-ancestors 'none'".encode(),
        ),
    ]
    return body, headers
