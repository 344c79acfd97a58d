"""Shipped workflows (UI format + API twins) are loadable and type-correct, without ComfyUI (issue #3).

Known node types: ours (read from the pack), the core ComfyUI nodes in tests/comfy_testing/core_nodes.json
(schemas dumped from ComfyUI v0.3.64), and the frontend-only Note.
"""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TOOLS = REPO / "tests" / "comfy_testing"


def _load(name, path):
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


wt = _load("workflow_tools", TOOLS / "workflow_tools.py")
bw = _load("build_workflows", TOOLS / "build_workflows.py")
SPECS = bw.all_specs()
UI_FILES = sorted((REPO / "workflows").glob("*.json"))
API_FILES = sorted((REPO / "workflows" / "api").glob("*.json"))


def test_five_workflows_with_api_twins():
    assert len(UI_FILES) == 5
    assert [p.name for p in API_FILES] == [p.name for p in UI_FILES]


@pytest.fixture(params=UI_FILES, ids=lambda p: p.stem)
def ui(request):
    return json.loads(request.param.read_text())


def test_ui_format_and_note(ui):
    assert {"nodes", "links", "last_node_id", "last_link_id", "version"} <= set(ui)
    ids = [n["id"] for n in ui["nodes"]]
    assert len(set(ids)) == len(ids) and max(ids) <= ui["last_node_id"]
    notes = [n for n in ui["nodes"] if n["type"] == "Note"]
    assert len(notes) == 1 and len(notes[0]["widgets_values"][0]) > 200


def test_only_known_node_types(ui):
    for n in ui["nodes"]:
        assert n["type"] in SPECS or n["type"] in wt.FRONTEND_ONLY, f"unknown node type {n['type']}"


def test_widget_values_match_inputs(ui):
    for n in ui["nodes"]:
        if n["type"] in wt.FRONTEND_ONLY:
            continue
        spec = SPECS[n["type"]]
        slots = wt.widget_slots(spec)
        values = n.get("widgets_values", [])
        assert len(values) == len(slots), f"{n['type']} #{n['id']}: {len(values)} values for widgets {slots}"
        for (name, kind), value in zip(slots, values):
            inp = next(i for i in spec["inputs"] if i["name"] == name)
            if kind == "control":
                assert value in wt.CONTROL_VALUES
            elif kind == "upload":
                assert value == "image"
            else:
                err = wt.check_widget_value(inp, value)
                assert err is None, f"{n['type']} #{n['id']}.{name}: {err}"


def test_nodes_do_not_overlap(ui):
    """Boxes with their title bars, at the sizes the frontend draws (tests/integration/test_workflows_browser_comfy.py
    checks those against the real frontend, also after a run with latent previews on)."""
    def box(n):  # with the room latent previews take below a sampling node when they are on
        (x, y), (w, h) = n["pos"], n["size"]
        return x, y - bw.TITLE_HEIGHT, x + w, y + h + bw.LATENT_PREVIEW_ROOM.get(n["type"], 0)
    nodes = ui["nodes"]
    for i, a in enumerate(nodes):
        for b in nodes[i + 1:]:
            A, B = box(a), box(b)
            assert not (A[0] < B[2] and B[0] < A[2] and A[1] < B[3] and B[1] < A[3]), (
                f"{a.get('title') or a['type']} #{a['id']} {A} overlaps {b.get('title') or b['type']} #{b['id']} {B}")


# Frontends from 1.42 draw titles in Inter 14 px (they ship the font, so every artist sees the same widths) and cut
# a title wider than the node less two title-bar heights (60 px) to "..." (litegraph's drawTitleText; the
# frontend's 1.27 drew Arial, narrower). Inter's advance widths at 14 px, in px, for the characters titles use
# (measured with Pillow from comfyui_frontend_package 1.58.1's inter-latin-normal.woff2); others count as 'W'.
INTER_14 = {3.4: "ijl", 3.8: "I", 3.9: " ", 4.0: "!,.:", 4.2: "';", 4.5: "`", 4.6: "t", 4.7: "|", 5.0: "/\\",
            5.1: "()[]", 5.2: "f", 5.3: "r", 5.7: "1", 6.0: "{}", 6.4: "-_", 6.5: '"', 6.6: "^", 7.0: "*", 7.2: "?",
            7.4: "s", 7.6: "x", 7.7: "kz", 7.9: "7Lavy", 8.0: "Jc", 8.2: "e", 8.3: "5Fhnu", 8.4: "Eo", 8.5: "2",
            8.6: "3bdgpq", 8.7: "689", 8.8: "0Z", 8.9: "#P", 9.0: "$&4RST", 9.2: "B", 9.3: "+<=>~", 9.4: "K",
            9.5: "XY", 9.7: "AV", 10.1: "D", 10.2: "C", 10.4: "HU", 10.5: "GN", 10.7: "OQ", 11.5: "w", 12.3: "m",
            12.6: "M", 13.5: "@", 13.8: "%W"}
TITLE_MARGIN = 60
STOCK_DISPLAY_NAMES = {"CLIPVisionLoader": "Load CLIP Vision", "CheckpointLoaderSimple": "Load Checkpoint",
                       "EmptyLatentImage": "Empty Latent Image", "MaskToImage": "Convert Mask to Image",
                       "SaveImage": "Save Image", "VAEDecode": "VAE Decode", "PreviewImage": "Preview Image",
                       "PreviewAny": "Preview Any", "CLIPTextEncode": "CLIP Text Encode (Prompt)"}


_INTER_WIDTH = {c: w for w, chars in INTER_14.items() for c in chars}


def title_width(title: str) -> float:
    return sum(_INTER_WIDTH.get(c, _INTER_WIDTH["W"]) for c in title)


def test_titles_fit_their_nodes(ui):
    """Review s29 (frontend 1.58.1): 'Loss / reward / outside-mask change' was drawn cut short, and its node grew
    over the Report node beside it."""
    from pack_loader import load_pack
    names = {**STOCK_DISPLAY_NAMES, **load_pack().NODE_DISPLAY_NAME_MAPPINGS}
    for n in ui["nodes"]:
        title = n.get("title") or names.get(n["type"], n["type"])
        need = title_width(title) + TITLE_MARGIN
        assert need <= n["size"][0], f"#{n['id']} title {title!r} needs ~{need:.0f} px, its node is {n['size'][0]}"


def test_links_are_type_correct(ui):
    nodes = {n["id"]: n for n in ui["nodes"]}
    assert len({l[0] for l in ui["links"]}) == len(ui["links"])
    for link_id, src, src_slot, dst, dst_slot, kind in ui["links"]:
        s, d = nodes[src], nodes[dst]
        out = s["outputs"][src_slot]
        inp = d["inputs"][dst_slot]
        assert out["type"] == kind and link_id in out["links"]
        assert inp["type"] in (kind, "*") and inp["link"] == link_id
        spec_out = SPECS[s["type"]]["outputs"][src_slot]
        spec_in = next(i for i in SPECS[d["type"]]["inputs"] if i["name"] == inp["name"])
        assert spec_out == kind, f"{s['type']} output {src_slot} is {spec_out}, link says {kind}"
        assert spec_in["type"] in (kind, "*"), f"{d['type']}.{inp['name']} takes {spec_in['type']}, gets {kind}"


def test_required_sockets_connected(ui):
    for n in ui["nodes"]:
        if n["type"] in wt.FRONTEND_ONLY:
            continue
        linked = {i["name"] for i in n.get("inputs", []) if i.get("link") is not None}
        for inp in SPECS[n["type"]]["inputs"]:
            if inp["required"] and not wt.is_widget(inp):
                assert inp["name"] in linked, f"{n['type']} #{n['id']}: required input {inp['name']} is not connected"


def test_checked_in_files_equal_the_builder():
    built = bw.build_all()
    for name, (ui, api) in built.items():
        assert json.loads((REPO / "workflows" / f"{name}.json").read_text()) == ui, \
            f"workflows/{name}.json is stale: run python tests/comfy_testing/build_workflows.py"
        assert json.loads((REPO / "workflows" / "api" / f"{name}.json").read_text()) == api


@pytest.mark.parametrize("path", API_FILES, ids=lambda p: p.stem)
def test_api_twins_have_every_required_input(path):
    api = json.loads(path.read_text())
    for node_id, node in api.items():
        spec = SPECS[node["class_type"]]
        for inp in spec["inputs"]:
            if inp["required"]:
                assert inp["name"] in node["inputs"], f"{path.name} #{node_id} {node['class_type']} lacks {inp['name']}"
        for value in node["inputs"].values():
            if isinstance(value, list):
                assert value[0] in api, f"{path.name} #{node_id} links to missing node {value[0]}"


def test_workflow_5_wires_the_reward_files_and_explains_them():
    """Aesthetic (head + CLIP_VISION) and safety rewards, combined, drive saliency masks; the note says where
    each file comes from and where it goes (issue #5)."""
    ui = json.loads((REPO / "workflows" / "focusfix_5_fix_with_aesthetic_safety.json").read_text())
    api = json.loads((REPO / "workflows" / "api" / "focusfix_5_fix_with_aesthetic_safety.json").read_text())
    by_type = {}
    for node_id, node in api.items():
        by_type.setdefault(node["class_type"], []).append((node_id, node["inputs"]))
    (cv_id, cv), = by_type["CLIPVisionLoader"]
    assert cv["clip_name"] == bw.CLIP_VISION_FILE
    rewards = {inputs["reward_name"]: (node_id, inputs) for node_id, inputs in by_type["FocusFixLoadReward"]}
    assert set(rewards) == set(bw.REWARD_FILES)
    assert rewards[bw.AESTHETIC_FILE][1]["clip_vision"] == [cv_id, 0]
    assert "clip_vision" not in rewards[bw.SAFETY_FILE][1]
    (combine_id, combine), = by_type["FocusFixCombineRewards"]
    assert {combine["reward_a"][0], combine["reward_b"][0]} == {rewards[f][0] for f in bw.REWARD_FILES}
    (_, sal), = by_type["FocusFixSaliencyMask"]
    (_, train), = by_type["FocusFixTrainFocusNFix"]
    assert sal["mask_source"] == "saliency" and train["mask_source"] == "saliency"
    for kind in ("FocusFixScoreImages", "FocusFixSaliencyMask", "FocusFixTrainFocusNFix", "FocusFixCompare"):
        assert all(inputs["reward"] == [combine_id, 0] for _, inputs in by_type[kind]), kind
    note = next(n for n in ui["nodes"] if n["type"] == "Note")["widgets_values"][0]
    for needle in ("sac+logos+ava1-l14-linearMSE.pth", "improved-aesthetic-predictor", "convert-reward",
                   "models/focusfix_rewards", "models/clip_vision", "CompVis/stable-diffusion-safety-checker",
                   "openai/clip-vit-large-patch14", *bw.REWARD_FILES, bw.CLIP_VISION_FILE):
        assert needle in note, needle


def test_ksamplers_use_the_train_nodes_sampler_settings():
    """A KSampler beside a Train Focus-N-Fix node draws its I0 only with the same steps, cfg, sampler_name and
    scheduler (the workflow notes promise this)."""
    checked = []
    for path in API_FILES:
        api = json.loads(path.read_text())
        trains = [n["inputs"] for n in api.values() if n["class_type"] == "FocusFixTrainFocusNFix"]
        samplers = [n["inputs"] for n in api.values() if n["class_type"] == "KSampler"]
        for train in trains:
            for ks in samplers:
                for name in ("steps", "cfg", "sampler_name", "scheduler"):
                    assert ks[name] == train[name], \
                        f"{path.name}: KSampler {name} {ks[name]!r} vs Train {train[name]!r}"
                checked.append(path.name)
    assert len(set(checked)) >= 3, checked  # workflows 1, 2 and 5 pair them
