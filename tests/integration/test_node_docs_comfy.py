"""The node help pages as ComfyUI's frontend fetches them: a real server (main.py, CPU, the `server` fixture of
conftest.py) serves the pack's WEB_DIRECTORY, and the URL the frontend builds from /object_info's
python_module returns each page.

Skipped, with the reason shown, without COMFYUI_DIR (conftest.py and the `server` fixture).
"""
from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "web" / "docs"  # the root module's WEB_DIRECTORY ("./web"; test_node_docs.py checks it holds them)


def _fetch(url: str) -> tuple[int, str]:
    """(HTTP status, body text) of a GET, also for an error status."""
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read().decode("utf-8")
    except urllib.error.HTTPError as e:
        return e.code, ""


def _frontend_pack_name(python_module: str) -> str | None:
    """The pack name ComfyUI's frontend (1.27.10, extractCustomNodeName + normalizePackId) reads from a node's
    python_module: 'custom_nodes.<folder>[@version]' -> '<folder>'."""
    parts = (python_module or "").split(".")
    return parts[1].split("@")[0] if len(parts) >= 2 and parts[0] == "custom_nodes" else None


def _frontend_help(url: str, pack: str, node: str, locale: str = "en") -> tuple[int, str]:
    """NodeHelpService.fetchCustomNodeHelp: docs/<node>/<locale>.md, else docs/<node>.md."""
    status, text = _fetch(f"{url}/extensions/{pack}/docs/{node}/{locale}.md")
    if status != 200:
        status, text = _fetch(f"{url}/extensions/{pack}/docs/{node}.md")
    return status, text


def _page(node: str, locale: str = "en") -> str:
    own = DOCS / node / f"{locale}.md"
    return (own if own.is_file() else DOCS / f"{node}.md").read_text(encoding="utf-8")


def test_help_page_is_served(server):
    status, text = _fetch(f"{server.url}/extensions/{server.pack}/docs/FocusFixTrainFocusNFix.md")
    assert status == 200, f"GET /extensions/{server.pack}/docs/FocusFixTrainFocusNFix.md: HTTP {status}"
    assert text == (DOCS / "FocusFixTrainFocusNFix.md").read_text(encoding="utf-8")


def test_frontend_finds_every_page_from_object_info(server):
    """python_module names the folder ComfyUI serves the pack's web directory under, so the URL the frontend
    builds from it returns the page."""
    info = server.get("/object_info", timeout=60)
    ours = sorted(k for k, v in info.items() if k.startswith("FocusFix") and v["category"] != "FocusFix/testing")
    assert ours == sorted(p.stem for p in DOCS.glob("*.md"))
    for node in ours:
        module = info[node]["python_module"]
        assert _frontend_pack_name(module) == server.pack, f"{node}: python_module {module!r}"
        status, text = _frontend_help(server.url, _frontend_pack_name(module), node)
        assert status == 200, f"{node}: the frontend's help URL gives HTTP {status}"
        assert text == _page(node), node
