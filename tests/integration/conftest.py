"""Integration tests against a real ComfyUI checkout: set COMFYUI_DIR (skipped, with the reason shown, otherwise).

Run: COMFYUI_DIR=/path/to/ComfyUI <comfy venv>/bin/python -m pytest tests/integration -q

Everything runs in-process on the CPU: ComfyUI's folders point into a temp dir, its built-in extra nodes
(GrowMask, MaskComposite, ...) are initialised, and two packs are loaded through ComfyUI's own
`nodes.load_custom_node`: FocusFix itself (via a `custom_nodes/ComfyUI-FocusFix` symlink, as users install
it) and the test-only tiny-checkpoint pack in tests/comfy_testing.
"""
from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
PACK = "ComfyUI-FocusFix"  # the pack's folder name in custom_nodes, as users install it
COMFYUI_DIR = os.environ.get("COMFYUI_DIR", "")
SKIP_REASON = ("COMFYUI_DIR is not set: ComfyUI integration tests skipped "
               "(point it at a ComfyUI checkout and run with that ComfyUI's python)")
# Another frontend for the `server` fixture (ComfyUI's --front-end-root): the `static` folder of a
# comfyui_frontend_package, to check the workflows in a newer frontend than the checkout's requirements pin.
FRONTEND_ROOT = os.environ.get("COMFYUI_FRONTEND_ROOT", "")
MODEL_FOLDERS = ("checkpoints", "clip_vision", "focusfix_rewards", "loras")  # the server's, under its temp folder


def load_tool(name: str):
    """A module from tests/comfy_testing by file path (tests/ is not a package)."""
    import importlib.util
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "tests" / "comfy_testing" / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


@pytest.fixture(scope="session")
def wt():
    return load_tool("workflow_tools")


@pytest.fixture(scope="session")
def bw(wt):
    """tests/comfy_testing/build_workflows.py: the shipped workflows' builder (node specs, file names)."""
    return load_tool("build_workflows")


class Server(NamedTuple):
    """A running ComfyUI server: its base URL and temp folder (out/, in/, user/, server.log)."""
    url: str
    tmp: Path
    pack: str = PACK  # the pack's folder in its custom_nodes

    def get(self, path: str, data=None, timeout: float = 10):
        """The JSON answer to GET url+path, or to a POST of `data` as JSON."""
        req = urllib.request.Request(self.url + path, data=None if data is None else json.dumps(data).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())


@pytest.fixture(scope="module")
def server(tmp_path_factory, request):
    """A real ComfyUI server (main.py, CPU) with FocusFix in a custom_nodes folder as users install it
    (custom_nodes/ComfyUI-FocusFix), and the test-only tiny pack; outputs, inputs, user data and previews in a temp
    folder, never in the ComfyUI checkout. A test module's SERVER_ARGS (a list) are added to main.py's arguments."""
    if not COMFYUI_DIR:
        pytest.skip(SKIP_REASON)
    if FRONTEND_ROOT and not Path(FRONTEND_ROOT, "index.html").is_file():
        pytest.fail(f"COMFYUI_FRONTEND_ROOT={FRONTEND_ROOT!r} holds no index.html: point it at the static folder of "
                    "a comfyui_frontend_package (pip install --target DIR --no-deps comfyui-frontend-package==V)")
    tmp = tmp_path_factory.mktemp("server")
    custom = tmp / "custom_nodes"
    custom.mkdir()
    (custom / PACK).symlink_to(REPO, target_is_directory=True)
    (custom / "focusfix_test_tiny").symlink_to(REPO / "tests" / "comfy_testing", target_is_directory=True)
    # model folders in tmp, first (is_default: a Save LoRA queued here writes there, not into the checkout), empty
    # unless a test puts files there
    (tmp / "extra.yaml").write_text(f"focusfix_test:\n    base_path: {tmp}\n    custom_nodes: custom_nodes/\n"
                                    f"focusfix_test_models:\n    base_path: {tmp}\n    is_default: true\n"
                                    + "".join(f"    {d}: models/{d}/\n" for d in MODEL_FOLDERS))
    for d in MODEL_FOLDERS:
        (tmp / "models" / d).mkdir(parents=True)
    for d in ("out", "in", "user"):
        (tmp / d).mkdir()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(tmp / "server.log", "w")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
         "--database-url", "sqlite:///:memory:", "--output-directory", str(tmp / "out"),
         "--input-directory", str(tmp / "in"), "--user-directory", str(tmp / "user"),
         "--temp-directory", str(tmp),  # previews go to tmp/temp, not into the ComfyUI checkout
         "--extra-model-paths-config", str(tmp / "extra.yaml")]
        + (["--front-end-root", FRONTEND_ROOT] if FRONTEND_ROOT else []) + getattr(request.module, "SERVER_ARGS", []),
        cwd=COMFYUI_DIR, stdout=log, stderr=subprocess.STDOUT, env=env)
    srv = Server(f"http://127.0.0.1:{port}", tmp)
    try:
        deadline = time.time() + 180
        while True:
            try:
                srv.get("/object_info/FocusFixApplyLoRA", timeout=5)
                break
            except Exception:
                if proc.poll() is not None or time.time() > deadline:
                    raise AssertionError("server did not start:\n" + (tmp / "server.log").read_text()[-3000:])
                time.sleep(1)
        yield srv
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="session")
def tiny_models(comfy):
    return load_tool("tiny_models")


def pytest_collection_modifyitems(config, items):
    if COMFYUI_DIR and Path(COMFYUI_DIR, "comfy").is_dir():
        return
    reason = SKIP_REASON if not COMFYUI_DIR else f"COMFYUI_DIR={COMFYUI_DIR!r} holds no ComfyUI checkout (no comfy/)"
    for item in items:
        if "integration" in str(item.fspath):
            item.add_marker(pytest.mark.skip(reason=reason))


@dataclass
class Comfy:
    """Handles on the in-process ComfyUI."""

    root: Path
    tmp: Path
    pack: object                 # the FocusFix module as ComfyUI loaded it
    nodes: object                # ComfyUI's nodes module (NODE_CLASS_MAPPINGS of everything loaded)
    progress: list = field(default_factory=list)
    interrupt_at: int | None = None      # cancel once a progress bar reaches this value ...
    interrupt_total: int | None = None   # ... on a bar of this total (None: any bar)

    @property
    def loras(self) -> Path:
        return self.tmp / "models" / "loras"

    def node(self, class_type: str):
        return self.nodes.NODE_CLASS_MAPPINGS[class_type]

    def run(self, class_type: str, **inputs):
        """Run one node (V1, or V3 with its NodeOutput) the way ComfyUI does: inside torch.inference_mode()."""
        cls = self.node(class_type)
        with torch.inference_mode():
            out = getattr(cls(), cls.FUNCTION)(**inputs)
        return out["result"] if isinstance(out, dict) else getattr(out, "result", out)

    def assert_map_size_refused(self, model, clip, resolution: int, size: int, match: str) -> None:
        """Attention Maps and Train Separate-and-Enhance both refuse `resolution` on this MODEL with `match`,
        before any progress (nothing sampled, no step)."""
        import pytest
        self.progress.clear()
        for node, kw in (("FocusFixAttentionMaps", dict(prompt="a cat and a dog", words="cat, dog", seed=0, steps=2,
                                                        cfg=3.0)),
                         ("FocusFixTrainSeparateEnhance", dict(prompts="a cat and a dog | cat, dog", lam_sep=1.0,
                                                               lam_en=1.0, lam_preserve=1.0, rank=2, targets="to_k",
                                                               lr=1e-2, iterations=1, seed=0))):
            with pytest.raises(ValueError, match=match):
                self.run(node, model=model, clip=clip, resolution=resolution, width=size, height=size, **kw)
        assert self.progress == []

    def execute(self, prompt: dict, extra_data: dict | None = None) -> "object":
        """Validate and execute an API-format prompt with ComfyUI's PromptExecutor (`extra_data` as POST /prompt
        sends it, e.g. {"extra_pnginfo": {"workflow": ...}}); returns the executor."""
        import execution
        pid = str(uuid.uuid4())
        valid = asyncio.run(execution.validate_prompt(pid, prompt, None))
        if not valid[0]:
            raise AssertionError(f"prompt invalid: {valid[1]} {valid[3]}")
        ex = execution.PromptExecutor(_Server(), cache_type=False)
        ex.execute(prompt, pid, extra_data or {}, valid[2])
        return ex


class _Server:
    """The little of PromptServer that PromptExecutor uses, recording events."""

    def __init__(self):
        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None
        self.events = []

    def send_sync(self, event, data, sid=None):
        self.events.append((event, data))

    def queue_updated(self):
        pass


def _setup(tmp: Path) -> Comfy:
    root = Path(COMFYUI_DIR).resolve()
    for p in (str(root),):
        if p not in sys.path:
            sys.path.insert(0, p)
    import comfy.cli_args
    comfy.cli_args.args.cpu = True
    comfy.cli_args.args.disable_all_custom_nodes = False
    import comfy.model_management  # noqa: F401  (reads args.cpu at import)
    import comfy.utils
    import folder_paths
    for sub in ("output", "input", "temp", "user", "models/loras", "models/focusfix_rewards"):
        (tmp / sub).mkdir(parents=True, exist_ok=True)
    folder_paths.set_output_directory(str(tmp / "output"))
    folder_paths.set_input_directory(str(tmp / "input"))
    folder_paths.set_temp_directory(str(tmp / "temp"))
    folder_paths.set_user_directory(str(tmp / "user"))
    folder_paths.models_dir = str(tmp / "models")
    folder_paths.folder_names_and_paths["loras"] = ([str(tmp / "models" / "loras")], folder_paths.supported_pt_extensions)
    import nodes
    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    custom = tmp / "custom_nodes"
    custom.mkdir(exist_ok=True)
    (custom / "ComfyUI-FocusFix").symlink_to(REPO, target_is_directory=True)
    (custom / "focusfix_test_tiny").symlink_to(REPO / "tests" / "comfy_testing", target_is_directory=True)
    for pack in ("ComfyUI-FocusFix", "focusfix_test_tiny"):
        ok = asyncio.run(nodes.load_custom_node(str(custom / pack)))
        assert ok, f"ComfyUI failed to import {pack} (see the log above)"
    pack = sys.modules[str(custom / "ComfyUI-FocusFix").replace(".", "_x_")]
    comfy_ = Comfy(root=root, tmp=tmp, pack=pack, nodes=nodes)

    def hook(value, total, preview, prompt_id=None, node_id=None):
        comfy_.progress.append((value, total, preview))
        if comfy_.interrupt_at is not None and value >= comfy_.interrupt_at and \
                comfy_.interrupt_total in (None, total):
            comfy.model_management.interrupt_current_processing(True)
        comfy.model_management.throw_exception_if_processing_interrupted()

    comfy.utils.set_progress_bar_global_hook(hook)
    return comfy_


@pytest.fixture(scope="session")
def comfy(tmp_path_factory):
    if not COMFYUI_DIR:
        pytest.skip(SKIP_REASON)
    torch.set_num_threads(1)  # tiny models: threads only fight over the shared cores
    return _setup(tmp_path_factory.mktemp("comfy"))


@pytest.fixture
def fresh(comfy):
    """Reset per-test state: progress log, pending interrupt, files in the loras folder."""
    import comfy.model_management as mm
    comfy.progress.clear()
    comfy.interrupt_at = comfy.interrupt_total = None
    mm.interrupt_current_processing(False)
    for f in comfy.loras.rglob("*"):
        if f.is_file():
            f.unlink()
    yield comfy
    comfy.interrupt_at = comfy.interrupt_total = None
    mm.interrupt_current_processing(False)


@pytest.fixture(scope="session", params=["sd15", "sdxl"])
def layout(request):
    return request.param


@pytest.fixture(scope="session")
def checkpoint(comfy, layout):
    """(MODEL, CLIP, VAE) of a tiny model, built under inference mode like a loader node's."""
    return comfy.run("FocusFixTestTinyCheckpoint", layout=layout, seed=0)
