"""Open a page in headless Chromium over the DevTools protocol and report what rendered.

A websocket to Chromium's DevTools endpoint (aiohttp's client: already installed, DVC depends on it)
and a small JavaScript harness, added before any page script runs: it wraps ``vegaEmbed`` as
vega-embed defines it, so every embed's promise is kept and, once settled, its view's scenegraph is
walked for the marks it drew. :func:`open_page` returns every embed (container id, marks by type, or
the error), every ``<img>`` (loaded or not), the console errors and uncaught exceptions, and every
request the page made, with any http(s)/ws(s) request blocked and recorded.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

HARNESS = r"""
window.__embeds = [];
(() => {
  let wrapped;
  function marks(node, out) {  // scenegraph: marks hold items, group items hold marks
    for (const child of node.items || []) {
      if (child.marktype && child.marktype !== 'group') out[child.marktype] = (out[child.marktype] || 0) + (child.items || []).length;
      marks(child, out);
    }
    return out;
  }
  Object.defineProperty(window, 'vegaEmbed', {configurable: true, get() { return wrapped; }, set(embed) {
    wrapped = Object.assign(function (el, spec, opts) {
      const p = embed(el, spec, opts);
      window.__embeds.push(p.then(r => ({el: String(el), marks: marks(r.view.scenegraph().root, {})}), e => ({el: String(el), error: String(e)})));
      return p;
    }, embed);
  }});
})();
"""

RESULT = """(async () => {
  if (document.readyState !== 'complete') await new Promise(r => addEventListener('load', r));
  const embeds = await Promise.all(window.__embeds || []);
  const images = [...document.images].map(i => ({src: i.getAttribute('src'), ok: i.complete && i.naturalWidth > 0}));
  return JSON.stringify({embeds, images});
})()"""

FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-default-apps",
    "--metrics-recording-only",
)


def chromium() -> str | None:
    """Debian's ``chromium`` (or another Chromium/Chrome on PATH)."""
    return next((p for n in ("chromium", "chromium-browser", "google-chrome") if (p := shutil.which(n))), None)


async def _drive(ws_url: str, url: str, timeout: float) -> dict[str, Any]:
    import aiohttp

    loop = asyncio.get_running_loop()
    ids, pending, events = itertools.count(1), {}, []
    loaded = asyncio.Event()
    async with aiohttp.ClientSession() as http, http.ws_connect(ws_url, max_msg_size=0) as ws:

        async def read() -> None:
            async for msg in ws:
                data = json.loads(msg.data)
                if "id" in data:
                    fut = pending.pop(data["id"])
                    fut.set_exception(RuntimeError(data["error"])) if "error" in data else fut.set_result(data.get("result", {}))
                else:
                    events.append(data)
                    if data["method"] == "Page.loadEventFired":
                        loaded.set()

        async def send(method: str, **params: Any) -> dict:
            i = next(ids)
            pending[i] = loop.create_future()
            await ws.send_json({"id": i, "method": method, "params": params})
            return await pending[i]

        reader = asyncio.create_task(read())
        for domain in ("Network", "Runtime", "Log", "Page"):
            await send(f"{domain}.enable")
        await send("Network.setBlockedURLs", urls=["http://*", "https://*", "ws://*", "wss://*"])
        await send("Page.addScriptToEvaluateOnNewDocument", source=HARNESS)
        await send("Page.navigate", url=url)
        await asyncio.wait_for(loaded.wait(), timeout)
        r = await asyncio.wait_for(send("Runtime.evaluate", expression=RESULT, awaitPromise=True, returnByValue=True), timeout)
        await asyncio.sleep(0.2)  # late console messages
        reader.cancel()
    out = json.loads(r["result"]["value"])
    out["requests"] = [e["params"]["request"]["url"] for e in events if e["method"] == "Network.requestWillBeSent"]
    out["errors"] = [
        " ".join(str(a.get("value", a.get("description", ""))) for a in e["params"]["args"])
        for e in events
        if e["method"] == "Runtime.consoleAPICalled" and e["params"]["type"] in ("error", "assert")
    ]
    out["errors"] += [
        e["params"]["exceptionDetails"].get("exception", {}).get("description") or e["params"]["exceptionDetails"]["text"]
        for e in events
        if e["method"] == "Runtime.exceptionThrown"
    ]
    out["errors"] += [
        e["params"]["entry"]["text"] for e in events if e["method"] == "Log.entryAdded" and e["params"]["entry"]["level"] == "error"
    ]
    return out


def open_page(page: Path, timeout: float = 60.0) -> dict[str, Any]:
    """Load ``page`` (a local HTML file) in a fresh headless Chromium; see the module docstring."""
    exe = chromium()
    assert exe, "no chromium on PATH"
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        proc = subprocess.Popen(
            [exe, *FLAGS, "--remote-debugging-port=0", f"--user-data-dir={profile}", "about:blank"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            port_file, deadline = Path(profile) / "DevToolsActivePort", time.monotonic() + timeout
            while not (port_file.is_file() and len(port_file.read_text().splitlines()) >= 2):
                assert proc.poll() is None and time.monotonic() < deadline, f"chromium exited ({proc.returncode}) or never opened DevTools"
                time.sleep(0.1)
            port = port_file.read_text().splitlines()[0]
            return asyncio.run(_page(port, page.resolve().as_uri(), timeout))
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


async def _page(port: str, url: str, timeout: float) -> dict[str, Any]:
    import aiohttp

    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{port}/json/list") as r:
            targets = await r.json()
    ws_url = next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")
    return await _drive(ws_url, url, timeout)
