"""The shipped UI workflows in the real ComfyUI frontend: headless Chromium against a real server (main.py, CPU,
the `server` fixture of conftest.py, which serves the frontend of the comfyui_frontend_package it has).

For each workflows/*.json, loaded with `app.loadGraphData` the way the frontend opens a file or a template:
- every node type is registered, and loading raises nothing: no missing-nodes or error dialog, no toast (the
  frontend's schema validation and link repair report there), no page error, no console error or warning;
- each node's widgets hold the UI JSON's `widgets_values` under the names our model predicts
  (`workflow_tools.widget_slots`: control_after_generate and image upload slots included), and saving the loaded
  graph writes the same `widgets_values` and links back;
- `app.graphToPrompt()` gives the API twin workflows/api/<name>.json and `workflow_tools.ui_to_api`'s prompt;
- every node shows its title, and each input that /object_info gives a tooltip is a widget or a slot on it;
- and workflows 2 and 3, queued in the page on the test-only tiny checkpoint with latent previews on, train and
  leave no node covering another (Train Focus-N-Fix keeps its size with its progress preview; sampling nodes grow
  into the room left below them), with the saved LoRA's name in its Preview Any.

Run (Playwright and Chromium are test-only tools, not project dependencies):
    apt-get install -y chromium && <comfy venv>/bin/pip install playwright   # no `playwright install` needed
    COMFYUI_DIR=/path/to/ComfyUI <comfy venv>/bin/python -m pytest tests/integration/test_workflows_browser_comfy.py
Skipped, with the reason shown, without COMFYUI_DIR, without playwright, or without a Chromium (FOCUSFIX_CHROMIUM,
else /usr/bin/chromium, else chromium, chromium-browser or google-chrome on PATH). COMFYUI_FRONTEND_ROOT (conftest.py)
runs them in another frontend than the one ComfyUI pins: 1.27.10 (ComfyUI 0.3.64's), 1.30.6, 1.50.6 and 1.58.1
pass.
"""
from __future__ import annotations

import json
import os
import shutil
import urllib.request
from pathlib import Path

import pytest

sync_api = pytest.importorskip(
    "playwright.sync_api", reason="playwright is not installed: `pip install playwright` into ComfyUI's venv "
                                  "(a system Chromium is used; `playwright install` is not needed)")

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
UI_FILES = sorted((REPO / "workflows").glob("*.json"))
NOTE_SLOTS = [("text", "value")]  # Note / MarkdownNote: frontend-only nodes with one text widget
# Widgets the frontend adds on its own and sends in the prompt, though the node does not declare them (the server
# ignores undeclared inputs): PreviewAny's read-only text box, which shows the value after a run (and, in newer
# frontends, its display-mode switch).
FRONTEND_ONLY_INPUTS = {"PreviewAny": {"preview", "preview_text", "preview_markdown", "previewMode", "preview_mode"}}
# The model files the workflows' loaders name, as empty files in the server's folders: frontends from 1.50 mark a
# loader whose file is missing as in error (a user who has the file sees no such mark).
MODEL_WIDGETS = {"CheckpointLoaderSimple": ("ckpt_name", "checkpoints"),
                 "CLIPVisionLoader": ("clip_name", "clip_vision"),
                 "FocusFixLoadReward": ("reward_name", "focusfix_rewards")}
SLOT_WIDGET_NAMES = {"control": "control_after_generate", "upload": "upload"}
LOAD_TIMEOUT_MS = 180_000  # page start on 2 shared cores, beside a CPU ComfyUI
# Latent previews on, as many artists run ComfyUI: a node that shows them while it samples grows (the run test)
SERVER_ARGS = ["--preview-method", "latent2rgb"]


def find_chromium() -> tuple[str | None, str]:
    """(path of a Chromium executable or None, why none)."""
    env = os.environ.get("FOCUSFIX_CHROMIUM")
    if env:
        path = shutil.which(env)
        return (path, "") if path else (None, f"FOCUSFIX_CHROMIUM={env!r} is not an executable")
    for name in ("/usr/bin/chromium", "chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path, ""
    return None, ("no Chromium found: `apt-get install chromium` (Debian) or set FOCUSFIX_CHROMIUM to a "
                  "Chromium/Chrome executable")


# --- in the page ---------------------------------------------------------------------------------------------

# The app is ready once `window.app` is set (GraphView does it after app.setup: nodes registered, extensions set
# up) and the start-up workflow is open (the default graph, for a returning user with a fresh browser profile):
# loading ours earlier races it.
READY_JS = "() => !!(window.app && window.app.graph && window.app.graph.nodes.length > 0)"

LOAD_JS = """async (ui) => {
    const missing = [...new Set(ui.nodes.map(n => n.type))].filter(t => !(t in LiteGraph.registered_node_types));
    await app.loadGraphData(ui);
    let prompt = {output: null}, prompt_error = null;
    try {
        prompt = await app.graphToPrompt();
    } catch (e) {
        prompt_error = String(e);  // e.g. InvalidLinkError: the user's Queue would fail the same way
    }
    return {
        missing, prompt_error,
        nodes: app.graph.nodes.map(n => ({
            id: n.id, type: n.type, title: n.title, has_errors: !!n.has_errors, pos: [...n.pos], size: [...n.size],
            widgets: (n.widgets ?? []).map(w => ({name: w.name, value: w.value, saved: w.serialize !== false})),
            slots: (n.inputs ?? []).map(i => i.name),
        })),
        prompt: prompt.output,
        saved: app.graph.serialize(),
    };
}"""

# What the frontend shows after a load: open dialogs (missing nodes, load errors) and toasts (schema validation,
# "Workflow Links Fixed", ...).
SHOWN_JS = """() => ({
    dialogs: [...document.querySelectorAll('.p-dialog')].map(d => d.innerText.slice(0, 500)),
    toasts: [...document.querySelectorAll('.p-toast-message')].map(d => d.innerText.slice(0, 500)),
})"""


class ComfyPage:
    """One fresh browser context per workflow (no tabs, dialogs or stored workflows left from another load)."""

    def __init__(self, browser, url: str):
        self.browser, self.url = browser, url

    def load(self, ui: dict, then: str | None = None, settle_ms: int = 1500) -> dict:
        """Open ComfyUI, load `ui` as a user does, and return what the frontend made of it: the LOAD_JS result
        plus `shown` (dialogs, toasts) and `errors` (page errors, console errors and warnings) of the load, and
        under `then` what the JS function `then` returns when run after the load."""
        context = self.browser.new_context(viewport={"width": 1600, "height": 1000})
        try:
            page = context.new_page()
            errors = []
            page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
            page.on("console", lambda m: self._keep_console(m) and errors.append(f"console {m.type}: {m.text}"))
            page.goto(self.url, timeout=LOAD_TIMEOUT_MS)
            page.wait_for_function(READY_JS, timeout=LOAD_TIMEOUT_MS)
            page.wait_for_timeout(settle_ms)
            errors.clear()  # start-up noise is the frontend's, not the workflow's
            result = page.evaluate(LOAD_JS, ui)
            for n in result["nodes"] + result["saved"]["nodes"]:
                n["id"] = int(n["id"])  # frontends from 1.50 hold node ids as strings (saved files keep numbers)
            page.wait_for_timeout(settle_ms)  # image previews, dialogs and toasts come after loadGraphData returns
            result |= {"shown": page.evaluate(SHOWN_JS), "errors": errors}
            if then:
                result["then"] = page.evaluate(then)
            return result
        finally:
            context.close()

    def run(self, ui: dict, sizes: dict, timeout_s: float = 300) -> tuple[dict, dict, list]:
        """Load `ui`, set the widgets named in `sizes`, queue it as the Run button does and wait until ComfyUI
        says it ended: (what `load` returns, {"ended", "error", "refused"}, AFTER_RUN_JS's look at the nodes
        2.5 s later)."""
        context = self.browser.new_context(viewport={"width": 1600, "height": 1000})
        try:
            page = context.new_page()
            page.goto(self.url, timeout=LOAD_TIMEOUT_MS)
            page.wait_for_function(READY_JS, timeout=LOAD_TIMEOUT_MS)
            page.wait_for_timeout(1500)
            loaded = page.evaluate(LOAD_JS, ui)
            refused = page.evaluate(RUN_JS, sizes)
            if not refused:  # a prompt refused whole never runs: nothing would end
                page.wait_for_function("() => window.__ended !== null", timeout=timeout_s * 1000, polling=500)
            page.wait_for_timeout(2500)  # outputs and previews are drawn after the end message
            ended = page.evaluate("() => ({ended: window.__ended, error: window.__error})") | {"refused": refused}
            return loaded, ended, page.evaluate(AFTER_RUN_JS)
        finally:
            context.close()

    def _keep_console(self, msg) -> bool:
        # Offline, the frontend's calls to comfy.org (releases, the node registry) fail: not about the workflow.
        url = (msg.location or {}).get("url", "")
        return msg.type in ("error", "warning") and (not url.startswith("http") or url.startswith(self.url))


# --- checks: each returns a list of problems ----------------------------------------------------------------

def load_problems(loaded: dict) -> list[str]:
    """Missing node types, nodes in error, dialogs, toasts, page and console errors of one load."""
    problems = [f"node type not registered: {t}" for t in loaded["missing"]]
    problems += [f"node {n['id']} {n['type']} has errors" for n in loaded["nodes"] if n["has_errors"]]
    problems += [f"dialog: {d}" for d in loaded["shown"]["dialogs"]]
    problems += [f"toast: {t}" for t in loaded["shown"]["toasts"]]
    problems += [f"graphToPrompt failed: {loaded['prompt_error']}"] if loaded["prompt_error"] else []
    return problems + loaded["errors"]


def expected_widgets(node: dict, specs: dict, wt) -> list[tuple[str, object]]:
    """[(widget name, value)] our model says the frontend builds from the node's widgets_values."""
    if node["type"] not in specs and node["type"] not in wt.FRONTEND_ONLY:
        return [("<no spec for this node type>", node["type"])]
    slots = NOTE_SLOTS if node["type"] in wt.FRONTEND_ONLY else wt.widget_slots(specs[node["type"]])
    values = node.get("widgets_values") or []
    if len(values) != len(slots):
        return [("<model slots>", [name for name, _ in slots]), ("<widgets_values>", values)]
    return [(name if kind == "value" else SLOT_WIDGET_NAMES[kind], v) for (name, kind), v in zip(slots, values)]


def widget_mismatches(ui: dict, loaded: dict, specs: dict, wt) -> list[str]:
    """Nodes whose saved widgets (name, value) differ from the model's pairing of widgets_values."""
    got_by_id = {n["id"]: n for n in loaded["nodes"]}
    problems = []
    for node in ui["nodes"]:
        got = [(w["name"], w["value"]) for w in got_by_id[node["id"]]["widgets"] if w["saved"]]
        want = expected_widgets(node, specs, wt)
        if len(got) != len(want) or not all(g[0] == w[0] and same(g[1], w[1]) for g, w in zip(got, want)):
            problems.append(f"node {node['id']} {node['type']}: frontend {got} != model {want}")
    return problems


def save_mismatches(ui: dict, loaded: dict) -> list[str]:
    """Differences between the shipped file and what the frontend would save: nodes' widgets_values, links."""
    saved = {n["id"]: n.get("widgets_values", []) for n in loaded["saved"]["nodes"]}
    problems = [f"node {n['id']} {n['type']}: widgets_values {n.get('widgets_values')} saved as {saved[n['id']]}"
                for n in ui["nodes"] if not same(n.get("widgets_values", []), saved[n["id"]])]
    return problems + diff(loaded["saved"]["links"], ui["links"], "links", "saved", "file")


def prompt_differences(frontend: dict, other: dict, ui: dict, other_name: str) -> list[str]:
    """Differences between the frontend's API prompt and `other` (twin or model): node ids, class types, inputs,
    and the titles of the nodes the UI names (untitled nodes' _meta titles differ harmlessly: the frontend writes
    the display name, the twin and the model the class type)."""
    titled = {str(n["id"]) for n in ui["nodes"] if n.get("title")}
    problems = []
    for nid in sorted(set(frontend) | set(other), key=int):
        if nid not in frontend or nid not in other:
            problems.append(f"node {nid}: only in {'frontend' if nid in frontend else other_name}")
            continue
        got, want = frontend[nid], other[nid]
        drop = FRONTEND_ONLY_INPUTS.get(got["class_type"], set())
        got_inputs = {k: v for k, v in got["inputs"].items() if k not in drop}
        problems += diff(got["class_type"], want["class_type"], f"node {nid} class_type", "frontend", other_name)
        problems += diff(got_inputs, want["inputs"], f"node {nid} {got['class_type']} inputs", "frontend", other_name)
        if nid in titled:
            problems += diff(got["_meta"]["title"], want.get("_meta", {}).get("title"), f"node {nid} title",
                             "frontend", other_name)
    return problems


def tooltip_gaps(loaded: dict, info: dict, ui: dict) -> list[str]:
    """Nodes not titled as the UI (or /object_info's display name) says, and inputs with a tooltip in /object_info
    that are neither a widget nor a slot on the loaded node."""
    titles = {n["id"]: n.get("title") for n in ui["nodes"]}
    problems = []
    for node in loaded["nodes"]:
        if node["type"] not in info:  # frontend-only (Note)
            continue
        want_title = titles[node["id"]] or info[node["type"]]["display_name"]
        if node["title"] != want_title:
            problems.append(f"node {node['id']} {node['type']}: title {node['title']!r}, expected {want_title!r}")
        shown = {w["name"] for w in node["widgets"]} | set(node["slots"])
        for group in ("required", "optional"):
            for name, spec in info[node["type"]]["input"].get(group, {}).items():
                if len(spec) > 1 and isinstance(spec[1], dict) and spec[1].get("tooltip") and name not in shown:
                    problems.append(f"node {node['id']} {node['type']}: input {name} (tooltip) not on the node")
    return problems


def same(a, b) -> bool:
    """JSON equality where 5 == 5.0 (JavaScript has one number type) but booleans are not numbers."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def diff(a, b, path: str, a_name: str, b_name: str) -> list[str]:
    """Readable differences between two JSON values (dict keys one by one)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = [f"{path}.{k}: only in {a_name if k in a else b_name} ({(a if k in a else b)[k]!r})"
               for k in sorted(a.keys() ^ b.keys())]
        for k in sorted(a.keys() & b.keys()):
            out += diff(a[k], b[k], f"{path}.{k}", a_name, b_name)
        return out
    return [] if same(a, b) else [f"{path}: {a_name} {a!r} != {b_name} {b!r}"]


def model_files(ui: dict, specs: dict, wt) -> list[tuple[str, str]]:
    """[(file name, model folder)] the UI's loader nodes name (FocusFix Load Reward's built-ins are no files)."""
    out = []
    for node in ui["nodes"]:
        if node["type"] in MODEL_WIDGETS:
            widget, folder = MODEL_WIDGETS[node["type"]]
            value = node["widgets_values"][[n for n, _ in wt.widget_slots(specs[node["type"]])].index(widget)]
            if not value.startswith("builtin:"):
                out.append((value, folder))
    return out


# --- fixtures -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def specs(bw):
    """The node specs the workflows were built from (ours + core_nodes.json): the model under test."""
    return bw.all_specs()


@pytest.fixture(scope="module")
def object_info(server):
    return server.get("/object_info", timeout=60)


@pytest.fixture(scope="module")
def chromium() -> str:
    path, why = find_chromium()
    if path is None:
        pytest.skip(why)
    return path


@pytest.fixture(scope="module")
def comfy_page(chromium, server, specs, wt):  # chromium first: without one, skip before starting a server
    """A ComfyPage on the server, with the images the workflows' LoadImage nodes name in its input folder (so
    their previews load: before a user's first run the image is missing and the frontend logs a 404)."""
    from PIL import Image
    url, tmp = server.url, server.tmp
    # A returning user: a first visit opens a blank graph and the templates browser instead of the default graph.
    req = urllib.request.Request(url + "/settings/Comfy.TutorialCompleted", data=b"true", method="POST")
    urllib.request.urlopen(req, timeout=30).close()
    for path in UI_FILES:
        ui = json.loads(path.read_text())
        for node in ui["nodes"]:
            if node["type"] == "LoadImage":
                Image.new("RGBA", (64, 64), (128, 128, 128, 255)).save(tmp / "in" / node["widgets_values"][0])
        for name, folder in model_files(ui, specs, wt):
            (tmp / "models" / folder / name).write_bytes(b"")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True)
        try:
            yield ComfyPage(browser, url)
        finally:
            browser.close()


@pytest.fixture(scope="module")
def loaded(comfy_page):
    """path -> (UI JSON, what the frontend made of it); each workflow is loaded once for all the checks."""
    cache = {}

    def load(path: Path):
        if path not in cache:
            ui = json.loads(path.read_text())
            cache[path] = ui, comfy_page.load(ui)
        return cache[path]
    return load


# --- tests ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.stem)
def test_loads_without_missing_nodes_or_errors(loaded, path):
    _, got = loaded(path)
    assert not load_problems(got), "\n".join(load_problems(got))


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.stem)
def test_widget_values_land_where_the_model_says(loaded, specs, wt, path):
    ui, got = loaded(path)
    problems = widget_mismatches(ui, got, specs, wt) + save_mismatches(ui, got)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.stem)
def test_graph_to_prompt_gives_the_api_twin_and_the_model(loaded, specs, wt, path):
    ui, got = loaded(path)
    assert got["prompt"] is not None, got["prompt_error"]
    twin = json.loads((REPO / "workflows" / "api" / path.name).read_text())
    problems = (prompt_differences(got["prompt"], twin, ui, "twin")
                + prompt_differences(got["prompt"], wt.ui_to_api(ui, specs), ui, "model"))
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.stem)
def test_titles_and_inputs_with_tooltips_are_on_the_nodes(loaded, object_info, path):
    ui, got = loaded(path)
    problems = tooltip_gaps(got, object_info, ui)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.stem)
def test_nodes_are_drawn_where_and_as_large_as_stored(loaded, path):
    """The frontend grows a node stored smaller than its widgets need, over its neighbours; tests/test_workflows.py
    checks that the stored boxes do not overlap, so this is the layout the artist sees."""
    ui, got = loaded(path)
    stored = {n["id"]: (n["pos"], n["size"]) for n in ui["nodes"]}
    problems = [f"node {n['id']} {n['type']}: drawn at {n['pos']} size {n['size']}, stored {stored[n['id']]}"
                for n in got["nodes"] if not same([n["pos"], n["size"]], list(stored[n["id"]]))]
    assert not problems, "\n".join(problems)


# What app.queuePrompt does around the prompt it POSTs: the widgets' beforeQueued callbacks, graphToPrompt, then
# their afterQueued callbacks (control_after_generate acts in one of them, as Comfy.WidgetControlMode says).
QUEUE_JS = """async () => {
    const callbacks = (name) => app.graph.nodes.forEach(n => (n.widgets ?? []).forEach(w => w[name]?.()));
    callbacks('beforeQueued');
    const sent = (await app.graphToPrompt()).output;
    callbacks('afterQueued');
    return {sent, next: (await app.graphToPrompt()).output};
}"""


def test_randomize_changes_the_seed_only_after_the_prompt(comfy_page):
    """ui_to_api sends the stored seed whatever control_after_generate says. The frontend applies the control
    around a Queue (setting Comfy.WidgetControlMode, default "after"): the prompt sent holds the stored seed, and
    only the next one a new seed."""
    path = next(p for p in UI_FILES if any(n["type"] == "KSampler" for n in json.loads(p.read_text())["nodes"]))
    ui = json.loads(path.read_text())
    ids = [str(n["id"]) for n in ui["nodes"] if n["type"] == "KSampler"]
    for node in ui["nodes"]:
        if node["type"] == "KSampler":
            node["widgets_values"][:2] = [123, "randomize"]  # seed, control_after_generate (KSampler's order)
    got = comfy_page.load(ui, then=QUEUE_JS)
    for prompt in (got["prompt"], got["then"]["sent"]):
        assert [prompt[i]["inputs"]["seed"] for i in ids] == [123] * len(ids)
    assert all(got["then"]["next"][i]["inputs"]["seed"] != 123 for i in ids)  # "randomize" was in effect


# Queue the loaded graph as the Run button does, and note when ComfyUI says it ended.
RUN_JS = """async (sizes) => {
    for (const n of app.graph.nodes) for (const w of (n.widgets ?? [])) if (w.name in sizes) w.value = sizes[w.name];
    window.__ended = null;
    window.__error = null;
    for (const t of ['execution_success', 'execution_error', 'execution_interrupted'])
        app.api.addEventListener(t, (e) => {
            window.__ended = t;
            if (t !== 'execution_success') window.__error = e.detail;
        });
    await app.queuePrompt(0, 1);
    const refused = app.lastNodeErrors ?? {};  // what ComfyUI refused when the prompt was queued
    return Object.keys(refused).length ? refused : null;
}"""
AFTER_RUN_JS = """() => app.graph.nodes.map(n => ({id: Number(n.id), type: n.type, title: n.title, pos: [...n.pos],
    size: [...n.size],
    images: (n.imgs ?? []).length,
    text: (n.widgets ?? []).filter(w => w.name === 'preview' || w.name === 'preview_text').map(w => w.value)}))"""


@pytest.mark.parametrize("name, trainer, saved", [
    ("focusfix_2_fix_what_reward_dislikes", "FocusFixTrainFocusNFix", "focusfix/reward_fix"),
    ("focusfix_3_separate_and_enhance", "FocusFixTrainSeparateEnhance", "focusfix/cat_and_dog")])
def test_after_a_run_no_node_covers_another(comfy_page, bw, name, trainer, saved):
    """Review s29: after a run, Train Focus-N-Fix had grown 204 px for its progress preview (the frontend keeps the
    room), over the KSampler and VAE Decode below it; with latent previews on, Attention Maps grew over Train
    Separate-and-Enhance; and Save LoRA's name showed nowhere. The workflow, queued in the page on the tiny
    checkpoint with latent previews on, trains, and no node then covers another (a sampling node grows into the
    room left below it); the Saved LoRA box shows the file."""
    ui = json.loads((REPO / "workflows" / f"{name}.json").read_text())
    for node in ui["nodes"]:
        if node["type"] == "CheckpointLoaderSimple":  # same outputs; its box keeps its stored size
            node["type"], node["widgets_values"] = "FocusFixTestTinyCheckpoint", ["sd15", 0, "fixed"]
    sizes = {"width": 64, "height": 64, "steps": 3, "iterations": 2, "K": 1, "resolution": 4}
    loaded, ended, after = comfy_page.run(ui, sizes)
    assert loaded["missing"] == [] and ended == {"ended": "execution_success", "error": None, "refused": None}, (
        loaded["missing"], ended)
    shown = {n["type"]: n for n in after}
    assert shown[trainer]["images"] or shown["FocusFixAttentionMaps"]["images"], "nothing was drawn: did it train?"
    def box(n):  # as drawn, title bar included
        (x, y), (w, h) = n["pos"], n["size"]
        return x, y - bw.TITLE_HEIGHT, x + w, y + h
    covered = [f"#{a['id']} {a['title']} {box(a)} covers #{b['id']} {b['title']} {box(b)}"
               for i, a in enumerate(after) for b in after[i + 1:]
               if box(a)[0] < box(b)[2] and box(b)[0] < box(a)[2] and box(a)[1] < box(b)[3] and box(b)[1] < box(a)[3]]
    assert not covered, covered
    stored = {n["id"]: n["size"] for n in ui["nodes"]}
    assert same(shown[trainer]["size"], stored[shown[trainer]["id"]]), shown[trainer]  # its previews have room
    box = next(n for n in after if n["title"] == "Saved LoRA")
    assert box["text"] and box["text"][0].startswith(saved) and box["text"][0].endswith(".safetensors"), box["text"]
