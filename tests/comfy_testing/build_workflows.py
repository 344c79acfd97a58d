"""Builds the shipped workflows (workflows/*.json, UI format) and their API twins (workflows/api/*.json).

Run from the repo root after changing a node schema or a workflow:  python tests/comfy_testing/build_workflows.py
The workflow tests check that the checked-in files equal what this script builds, so they never drift.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path[:0] = [str(HERE), str(HERE.parent)]
import workflow_tools as wt  # noqa: E402
from pack_loader import load_pack  # noqa: E402

CKPT = "v1-5-pruned-emaonly-fp16.safetensors"
# Files workflow 5 expects users to install (see NOTE_5); the tests put tiny ones under these names.
CLIP_VISION_FILE = "clip-vit-large-patch14.safetensors"            # models/clip_vision
AESTHETIC_FILE = "sac+logos+ava1-l14-linearMSE.safetensors"         # models/focusfix_rewards (converted)
SAFETY_FILE = "stable-diffusion-safety-checker.safetensors"         # models/focusfix_rewards
REWARD_FILES = (AESTHETIC_FILE, SAFETY_FILE)
NEGATIVE = "blurry, low quality"  # the KSamplers' and the trainers' negative prompt



def all_specs() -> dict:
    """Core + FocusFix node specs. The reward_name combo lists installed files, so here it also lists the
    reward files the shipped workflows expect users to install (REWARD_FILES)."""
    specs = {**wt.load_core_specs(), **wt.specs_from_mappings(load_pack().NODE_CLASS_MAPPINGS)}
    for inp in specs["FocusFixLoadReward"]["inputs"]:
        if inp["name"] == "reward_name":
            inp["choices"] = inp["choices"] + [f for f in REWARD_FILES if f not in inp["choices"]]
    return specs


# The frontend's (1.27) node sizes, below the title bar: a row per input socket or output (whichever are more), a
# row per widget, taller rows for multiline text, an image upload's preview, and a margin. A node stored smaller is
# grown on load, over its neighbours (tests/integration/test_workflows_browser_comfy.py measures these).
# PreviewAny shows its value in a multiline text box of the frontend's own; image outputs get room for the image.
# A node stored larger is drawn as stored: the minimum heights also give room for what newer frontends add
# (PreviewAny's display-mode switch: 112 px in frontend 1.42, 122 in 1.58).
TITLE_HEIGHT, SLOT_HEIGHT, WIDGET_HEIGHT, MULTILINE_HEIGHT, UPLOAD_PREVIEW, MARGIN = 30, 20, 24, 54, 232, 14
FRONTEND_MULTILINE = {"PreviewAny": 1}
MIN_NODE_HEIGHT = {"PreviewImage": 246, "SaveImage": 270, "PreviewAny": 122}
# Room a run adds: Train Focus-N-Fix shows its progress preview below its widgets, and the frontend grows the node
# by about 204 px for it (and keeps that size), unless the node has about 210 px free there already.
RUN_PREVIEW_HEIGHT = {"FocusFixTrainFocusNFix": 220}
# Nodes that show ComfyUI's latent previews while they sample, when it runs with them on (--preview-method auto,
# latent2rgb, taesd): the frontend grows them by about 212 px and keeps that size, so the layout leaves that much
# free below them (tests/test_workflows.py); Train Focus-N-Fix's room above holds its latent previews too.
LATENT_PREVIEW_ROOM = {"KSampler": 220, "FocusFixAttentionMaps": 220}


def node_height(class_type: str, spec: dict, sockets: int) -> int:
    """The frontend's height of a node of `spec` with `sockets` input sockets, title bar excluded."""
    widgets = {i["name"]: i for i in spec["inputs"] if wt.is_widget(i)}
    rows = [MULTILINE_HEIGHT if kind == "value" and widgets[name].get("multiline") else
            WIDGET_HEIGHT + (UPLOAD_PREVIEW if kind == "upload" else 0) for name, kind in wt.widget_slots(spec)]
    rows += [MULTILINE_HEIGHT] * FRONTEND_MULTILINE.get(class_type, 0)
    height = MARGIN + SLOT_HEIGHT * max(sockets, len(spec["outputs"])) + sum(rows)
    return max(height, MIN_NODE_HEIGHT.get(class_type, 0)) + RUN_PREVIEW_HEIGHT.get(class_type, 0)


class Graph:
    """A tiny UI-format graph writer: nodes with widgets_values in frontend order, typed links."""

    def __init__(self, specs: dict):
        self.specs, self.nodes, self.links = specs, [], []

    def add(self, class_type: str, pos, title: str | None = None, **widgets) -> dict:
        spec = self.specs[class_type]
        names = {i["name"] for i in spec["inputs"]}
        unknown = set(widgets) - names
        assert not unknown, f"{class_type} has no inputs {unknown}"
        values = []
        for name, kind in wt.widget_slots(spec):
            inp = next(i for i in spec["inputs"] if i["name"] == name)
            if kind == "control":
                values.append("fixed")
            elif kind == "upload":
                values.append("image")
            else:
                default = inp.get("default", inp["choices"][0] if inp.get("choices") else None)
                values.append(widgets.get(name, default))
        sockets = [i for i in spec["inputs"] if not wt.is_widget(i)]
        node = {
            "id": len(self.nodes) + 1, "type": class_type, "pos": list(pos),
            "size": [320 if class_type.startswith("FocusFix") else 270, node_height(class_type, spec, len(sockets))],
            "flags": {}, "order": 0, "mode": 0,
            "inputs": [{"name": i["name"], "type": i["type"], "link": None} for i in sockets],
            "outputs": [{"name": n, "type": t, "links": [], "slot_index": k}
                        for k, (n, t) in enumerate(zip(spec["output_names"], spec["outputs"]))],
            "properties": {"Node name for S&R": class_type},
            "widgets_values": values,
        }
        if title:
            node["title"] = title
        self.nodes.append(node)
        return node

    def note(self, text: str, pos, size=(420, 260)) -> dict:
        node = {"id": len(self.nodes) + 1, "type": "Note", "pos": list(pos), "size": list(size), "flags": {},
                "order": 0, "mode": 0, "inputs": [], "outputs": [], "properties": {}, "widgets_values": [text],
                "color": "#432", "bgcolor": "#653"}
        self.nodes.append(node)
        return node

    def link(self, src: dict, output: str, dst: dict, input: str) -> None:
        k = next(k for k, o in enumerate(src["outputs"]) if o["name"] == output)
        j = next(j for j, i in enumerate(dst["inputs"]) if i["name"] == input)
        out_type, in_type = src["outputs"][k]["type"], dst["inputs"][j]["type"]
        assert in_type in (out_type, "*"), f"{src['type']}.{output} ({out_type}) -> {dst['type']}.{input} ({in_type})"
        link_id = len(self.links) + 1
        self.links.append([link_id, src["id"], k, dst["id"], j, out_type])
        src["outputs"][k]["links"].append(link_id)
        dst["inputs"][j]["link"] = link_id

    def ui(self) -> dict:
        order = _topological(self.nodes, self.links)
        for node in self.nodes:
            node["order"] = order[node["id"]]
            for o in node["outputs"]:
                o["links"] = o["links"] or None
        return {"last_node_id": len(self.nodes), "last_link_id": len(self.links), "nodes": self.nodes,
                "links": self.links, "groups": [], "config": {}, "extra": {"ds": {"scale": 0.8, "offset": [0, 0]}},
                "version": 0.4}


def _topological(nodes, links) -> dict:
    deps = {n["id"]: {l[1] for l in links if l[3] == n["id"]} for n in nodes}
    order, done = {}, set()
    while len(done) < len(nodes):
        ready = sorted(i for i, d in deps.items() if i not in done and d <= done)
        for i in ready:
            order[i] = len(order)
        done |= set(ready)
    return order


def _checkpoint(g, pos=(0, 200)):
    return g.add("CheckpointLoaderSimple", pos, ckpt_name=CKPT)


def _sampler(g, model, pos_cond, neg_cond, latent, vae, x, y, title, prefix):
    # the trainers' sampler and defaults (seed 0, 20 steps, cfg 5, deterministic DDIM, "normal" sigmas): this KSampler
    # draws the trainer's images for the same prompts
    ks = g.add("KSampler", (x, y), title=title, seed=0, steps=20, cfg=5.0, sampler_name="ddim", scheduler="normal")
    g.link(model[0], model[1], ks, "model")
    g.link(pos_cond, "CONDITIONING", ks, "positive")
    g.link(neg_cond, "CONDITIONING", ks, "negative")
    g.link(latent, "LATENT", ks, "latent_image")
    dec = g.add("VAEDecode", (x + 300, y))
    g.link(ks, "LATENT", dec, "samples")
    g.link(vae, "VAE", dec, "vae")
    save = g.add("SaveImage", (x + 600, y), filename_prefix=prefix)
    g.link(dec, "IMAGE", save, "images")
    return dec


def _prompts(g, ckpt, text, x=350, y=700):
    pos = g.add("CLIPTextEncode", (x, y), title="Positive", text=text)
    neg = g.add("CLIPTextEncode", (x, y + 220), title="Negative", text=NEGATIVE)
    g.link(ckpt, "CLIP", pos, "clip")
    g.link(ckpt, "CLIP", neg, "clip")
    lat = g.add("EmptyLatentImage", (x, y + 440), width=512, height=512, batch_size=1)
    return pos, neg, lat


def _preview(g, src, output, pos, title=None):
    p = g.add("PreviewImage", pos, title=title)
    g.link(src, output, p, "images")
    return p


def _text(g, src, output, pos, title=None, size=None):
    p = g.add("PreviewAny", pos, title=title)
    g.link(src, output, p, "source")
    if size is not None:  # room to read a long text (a Train node's report) without scrolling
        p["size"] = list(size)
    return p


def _save(g, train, pos, filename, thumbnail=True, name_pos=None):
    """Save LoRA of `train`'s LoRA (its after image as the thumbnail), and a Preview Any beside it that shows the
    name the file was saved under: ComfyUI draws no text output on the node itself."""
    save = g.add("FocusFixSaveLoRA", pos, filename=filename)
    g.link(train, "lora", save, "lora")
    if thumbnail:
        g.link(train, "after", save, "preview")  # the LoRA's thumbnail in LoRA lists
    _text(g, save, "lora_name", name_pos or (pos[0] + 340, pos[1]), "Saved LoRA")
    return save


NOTE_1 = """FIX A REGION YOU PAINT (Focus-N-Fix)

Pass 1: Run once. 'KSampler (base)' draws the trainer's base image I0 for your prompt and seed (same settings, deterministic, so the same every run) and saves it as output/focusfix/before_*.png. The Train node waits for your mask: Load Image is outlined in red (its file is missing) until then, which is expected.
Pass 2: drag that image onto Load Image (or upload it there), right-click > Open in MaskEditor, paint what should change (hands, a face...) and save. Run again.

The painted MASK replaces the reward's own localisation: the reward (here sharpness; an aesthetic model from models/focusfix_rewards works the same) is pushed up while everything outside the paint is held to I0 by lam * ||(1-M)(I0 - I)||.
Save LoRA writes models/loras/focusfix/painted_fix.safetensors (loads in the stock Load LoRA; once that name is taken, painted_fix_00001... as the Saved LoRA box shows); Apply LoRA uses it right away in a normal KSampler, beside the same KSampler without it.
The KSamplers use the trainer's settings (same prompts, seed 0, 20 steps, cfg 5, sampler ddim, scheduler normal): 'KSampler (base)' draws the trainer's I0 and 'KSampler (with the LoRA)' its after image. Change them together: the Train node takes KSampler's sampler_name (ddim, euler, dpmpp_2m) and scheduler too.
Not done yet? Add FocusFix Load LoRA, pick the saved file, connect it to the Train node's continue_from and Run again: training goes on from that LoRA."""

NOTE_2 = """FIX WHAT A REWARD DISLIKES (Focus-N-Fix)

1. KSampler makes an image (with the trainer's settings: it is the trainer's base image I0 for seed 0); Score Images says how the reward rates it and shows its heatmap: where the reward dislikes the image (for sharpness, the blurry parts).
2. Saliency Mask (mask_source heatmap) turns that heatmap into the Focus-N-Fix mask M (1 = may change). Tune threshold_mode/threshold/dilation here while looking at the overlay (keep blur_sigma 2 and feather 0: training uses those).
3. Train Focus-N-Fix uses the same values (mask_source heatmap, threshold_mode, threshold, dilation) on its own base images I0, and trains a LoRA that raises the reward inside M while keeping the rest.
4. Compare shows before | after | change, the reward before/after and the change inside vs outside the mask (outside should stay near 0).

TUNE THE MASK BEFORE TRAINING: Run runs the whole graph, and ComfyUI starts the Train node early (it feeds a preview). To see and tune the mask first, select the Saliency Mask's Preview Image and click the play button in the toolbar above it (or its ... menu > Run Branch) to run only that branch; tune, then Run.

Another reward: one with a heatmap works as it is. One without (aesthetic, safety: workflow 5) needs mask_source saliency on Saliency Mask and the Train node: gradient sensitivity |dr/dI|, where a change moves the score most. That is not a map of what is bad (for sharpness it marks the parts that are already sharp), so use it only when the reward has no heatmap.

lam = 0 or mask_source none gives plain DRaFT (the whole image may change)."""

NOTE_3 = """SEPARATE AND ENHANCE (two objects in one prompt)

Models often merge or drop one of two objects ('a cat and a dog' -> a cat-dog, or just a cat).
Attention Maps (before) shows where 'cat' and 'dog' attend: overlap high = merged, a weak peak = dropped.
Train Separate-and-Enhance fine-tunes only the cross-attention keys (to_k) so the maps separate (lam_sep) and each gets strong (lam_en), while lam_preserve weights a penalty that keeps single-object prompts close to how the base model draws them.
Attention Maps (after) runs the same seed on the model with the LoRA: overlap should fall, both peaks rise. These are averaged over the sampling steps; the training curve takes them per step on random noise, so compare before with after, not with the curve.
Object words are written as in the prompt (first occurrence used; 'teddy bear' sums its tokens); two of the same kind need their own words: 'a black cat and a white cat | black cat, white cat'.
resolution: 16 for SD1.5 at 512 px, 32 for SDXL at 1024 px (SDXL has no cross-attention at 128)."""

NOTE_4 = """INSPECT ATTENTION

Where does each word of the prompt land? Attention Maps samples the prompt and averages the cross-attention maps of the words you list over all steps (at one map size: 16 for SD1.5 at 512 px, 32 for SDXL at 1024 px).
Words are separated by ',' or ';' and written as in the prompt (first occurrence used; a word of several tokens sums them).
Outputs: the maps as a MASK batch (one per word, shown here as images), the overlay grid (image, then each word), and the numbers Separate-and-Enhance works on: overlap (Separate loss) and each word's peak (Enhance), here averaged over the sampling steps."""


NOTE_5 = f"""FIX WITH THE AESTHETIC / SAFETY REWARD (Focus-N-Fix)

FILES (once; no extra Python packages). Press R in ComfyUI after copying them.
- Aesthetic head: sac+logos+ava1-l14-linearMSE.pth from LAION's improved-aesthetic-predictor (github.com/christophschuhmann/improved-aesthetic-predictor). Convert it to safetensors (never runs code from the file), in the ComfyUI-FocusFix folder with ComfyUI's python:
  python -m focusfix_core convert-reward sac+logos+ava1-l14-linearMSE.pth ../../models/focusfix_rewards/{AESTHETIC_FILE}
- CLIP ViT-L/14 image tower (the head scores its embeddings): model.safetensors of openai/clip-vit-large-patch14 -> models/clip_vision/{CLIP_VISION_FILE}. Load CLIP Vision feeds it to the aesthetic Load Reward.
- Safety checker: model.safetensors of CompVis/stable-diffusion-safety-checker -> models/focusfix_rewards/{SAFETY_FILE} (it holds its own CLIP tower).

HOW IT RUNS
1. Combine Rewards: r = weight_a * aesthetic + weight_b * safety. The aesthetic score runs about 1..10; the safety score is a cosine margin (> 0 = the checker passes, about -0.1..0.1), hence weight_b 10. For one reward alone, connect its Load Reward straight to Score Images, Saliency Mask, Train and Compare.
2. Neither reward has a heatmap: Score Images shows the scores and the gradient saliency |dr/dI|, a sensitivity map (where a change moves the score most), not a map of what is bad: check on the overlay that it marks the part you want fixed. Saliency Mask (mask_source saliency) turns it into M (1 = may change). Tune threshold_mode/threshold/dilation on the overlay (keep blur_sigma 2 and feather 0: training uses those), or paint the mask instead (workflow 1).
3. Train Focus-N-Fix (mask_source saliency, same values) raises r inside M and holds the rest to I0. Learned rewards can be gamed (pushed up by changes you do not want): set reward_target to the score that is good enough (read it off Score Images), and an image stops being pushed once it gets there.
4. Compare: before | after | change, r before/after, change inside vs outside M (outside should stay near 0).

TUNE THE MASK BEFORE TRAINING: Run runs the whole graph, and ComfyUI starts the Train node early (it feeds a preview). To see and tune the mask first, select the Saliency Mask's Preview Image and click the play button in the toolbar above it (or its ... menu > Run Branch) to run only that branch; tune, then Run.

MEMORY: each reward holds a CLIP ViT-L/14 tower, 1.14 GiB in fp32. On an 8-12 GB card set precision bf16 on both Load Reward nodes: 0.57 GiB each."""


def fix_painted_region(specs) -> dict:
    g = Graph(specs)
    g.note(NOTE_1, (-480, 0), (440, 420))
    ck = _checkpoint(g)
    reward = g.add("FocusFixLoadReward", (0, 450), reward_name="builtin:sharpness")
    paint = g.add("LoadImage", (0, 650), title="Load I0 (paint the mask here)", image="focusfix_I0_painted.png")
    train = g.add("FocusFixTrainFocusNFix", (400, 0), prompts="a photo of a woman waving her hand", seeds="0",
                  negative_prompt=NEGATIVE, mask_source="mask", lam=1.0, K=1, iterations=50, lr=1e-4, targets="attn")
    for out, inp in (("MODEL", "model"), ("CLIP", "clip"), ("VAE", "vae")):
        g.link(ck, out, train, inp)
    g.link(reward, "reward", train, "reward")
    g.link(paint, "MASK", train, "mask")
    _preview(g, train, "before", (820, -250), "Before (trainer)")
    _preview(g, train, "after", (1100, -250), "After (trainer)")
    _preview(g, train, "curve", (820, 50), "Training curves")
    _text(g, train, "report", (1100, 50), "Report", size=(420, 260))
    _save(g, train, (820, 350), "focusfix/painted_fix")
    apply = g.add("FocusFixApplyLoRA", (820, 550), strength=1.0)
    g.link(ck, "MODEL", apply, "model")
    g.link(train, "lora", apply, "lora")
    pos, neg, lat = _prompts(g, ck, "a photo of a woman waving her hand", x=400, y=1150)
    _sampler(g, (ck, "MODEL"), pos, neg, lat, ck, 820, 800, "KSampler (base)", "focusfix/before")
    _sampler(g, (apply, "model"), pos, neg, lat, ck, 820, 1320, "KSampler (with the LoRA)", "focusfix/after")
    return g.ui()


def fix_what_reward_dislikes(specs) -> dict:
    g = Graph(specs)
    g.note(NOTE_2, (-480, 0), (440, 380))
    ck = _checkpoint(g)
    reward = g.add("FocusFixLoadReward", (0, 450), reward_name="builtin:sharpness")
    prompt = "a photo of a cat on a sofa"
    pos, neg, lat = _prompts(g, ck, prompt, x=0, y=800)
    image = _sampler(g, (ck, "MODEL"), pos, neg, lat, ck, 400, 1050, "KSampler", "focusfix/sample")
    score = g.add("FocusFixScoreImages", (1300, 500))
    g.link(image, "IMAGE", score, "image")
    g.link(reward, "reward", score, "reward")
    _text(g, score, "text", (1650, 450), "Scores")
    _preview(g, score, "overlay", (1650, 650), "Where the reward dislikes it")
    # sharpness has a heatmap (its blurry parts): the mask comes from it. Gradient saliency would mark the parts
    # that are already sharp, where a change moves the score most
    sal = g.add("FocusFixSaliencyMask", (1300, 900), mask_source="heatmap", threshold_mode="top_percent",
                threshold=0.15, dilation=2)
    g.link(image, "IMAGE", sal, "image")
    g.link(reward, "reward", sal, "reward")
    _preview(g, sal, "overlay", (1650, 950), "Mask M (red = may change)")
    train = g.add("FocusFixTrainFocusNFix", (400, -100), prompts=prompt, seeds="0, 1", negative_prompt=NEGATIVE,
                  mask_source="heatmap", threshold_mode="top_percent", threshold=0.15, dilation=2, iterations=50)
    for out, inp in (("MODEL", "model"), ("CLIP", "clip"), ("VAE", "vae")):
        g.link(ck, out, train, inp)
    g.link(reward, "reward", train, "reward")
    cmp_ = g.add("FocusFixCompare", (820, -100))
    g.link(train, "before", cmp_, "before")
    g.link(train, "after", cmp_, "after")
    g.link(train, "mask", cmp_, "mask")
    g.link(reward, "reward", cmp_, "reward")
    _preview(g, cmp_, "grid", (1150, -250), "before | after | change")
    _text(g, cmp_, "text", (1450, -250), "Numbers")
    _preview(g, train, "curve", (1150, 50), "Training curves")
    _save(g, train, (820, 350), "focusfix/reward_fix", name_pos=(820, 520))
    return g.ui()


def separate_and_enhance(specs) -> dict:
    g = Graph(specs)
    g.note(NOTE_3, (-480, 0), (440, 330))
    ck = _checkpoint(g)
    prompt, words = "a cat and a dog", "cat, dog"
    before = g.add("FocusFixAttentionMaps", (400, -300), title="Attention Maps (before)", prompt=prompt, words=words)
    for out, inp in (("MODEL", "model"), ("CLIP", "clip"), ("VAE", "vae")):
        g.link(ck, out, before, inp)
    _preview(g, before, "overlay", (800, -400), "Before: image, cat, dog")
    _text(g, before, "text", (1100, -400), "Before: overlap / peaks")
    train = g.add("FocusFixTrainSeparateEnhance", (400, 370), prompts=f"{prompt} | {words}", iterations=200)
    g.link(ck, "MODEL", train, "model")
    g.link(ck, "CLIP", train, "clip")
    _preview(g, train, "curve", (800, 0), "Training curves")
    _preview(g, train, "attention_before", (1100, 0), "Maps before (training view)")
    _preview(g, train, "attention_after", (1400, 0), "Maps after (training view)")
    _save(g, train, (800, 300), "focusfix/cat_and_dog", thumbnail=False)
    apply = g.add("FocusFixApplyLoRA", (800, 500), strength=1.0)
    g.link(ck, "MODEL", apply, "model")
    g.link(train, "lora", apply, "lora")
    after = g.add("FocusFixAttentionMaps", (1150, 500), title="Attention Maps (after)", prompt=prompt, words=words)
    g.link(apply, "model", after, "model")
    g.link(ck, "CLIP", after, "clip")
    g.link(ck, "VAE", after, "vae")
    _preview(g, after, "overlay", (1550, 450), "After: image, cat, dog")
    _text(g, after, "text", (1550, 750), "After: overlap / peaks")
    return g.ui()


def inspect_attention(specs) -> dict:
    g = Graph(specs)
    g.note(NOTE_4, (-480, 0), (440, 260))
    ck = _checkpoint(g)
    att = g.add("FocusFixAttentionMaps", (400, 0), prompt="a red apple on a blue plate", words="apple, plate")
    for out, inp in (("MODEL", "model"), ("CLIP", "clip"), ("VAE", "vae")):
        g.link(ck, out, att, inp)
    _preview(g, att, "overlay", (800, -100), "Image, then each word")
    to_img = g.add("MaskToImage", (800, 300))
    g.link(att, "maps", to_img, "mask")
    _preview(g, to_img, "IMAGE", (1100, 300), "Maps (one per word)")
    _text(g, att, "text", (1100, -100), "Overlap / peaks")
    return g.ui()


def fix_with_aesthetic_safety(specs) -> dict:
    g = Graph(specs)
    g.note(NOTE_5, (-560, 0), (520, 560))
    ck = _checkpoint(g, (0, 650))
    cv = g.add("CLIPVisionLoader", (0, 0), clip_name=CLIP_VISION_FILE)
    aesthetic = g.add("FocusFixLoadReward", (0, 120), title="Aesthetic reward", reward_name=AESTHETIC_FILE)
    g.link(cv, "CLIP_VISION", aesthetic, "clip_vision")
    safety = g.add("FocusFixLoadReward", (0, 300), title="Safety reward", reward_name=SAFETY_FILE)
    reward = g.add("FocusFixCombineRewards", (0, 430), title="aesthetic + 10 x safety", weight_a=1.0, weight_b=10.0)
    g.link(aesthetic, "reward", reward, "reward_a")
    g.link(safety, "reward", reward, "reward_b")
    prompt = "a portrait photo of a woman in a garden"
    pos, neg, lat = _prompts(g, ck, prompt, x=0, y=950)
    image = _sampler(g, (ck, "MODEL"), pos, neg, lat, ck, 400, 1150, "KSampler", "focusfix/sample")
    score = g.add("FocusFixScoreImages", (1300, 800))
    g.link(image, "IMAGE", score, "image")
    g.link(reward, "reward", score, "reward")
    _text(g, score, "text", (1650, 750), "Scores")
    _preview(g, score, "overlay", (1650, 950), "Gradient saliency |dr/dI|")
    sal = g.add("FocusFixSaliencyMask", (1300, 1200), mask_source="saliency", threshold_mode="top_percent",
                threshold=0.15, dilation=2)
    g.link(image, "IMAGE", sal, "image")
    g.link(reward, "reward", sal, "reward")
    _preview(g, sal, "overlay", (1650, 1250), "Mask M (red = may change)")
    train = g.add("FocusFixTrainFocusNFix", (400, 0), prompts=prompt, seeds="0, 1", negative_prompt=NEGATIVE,
                  mask_source="saliency", threshold_mode="top_percent", threshold=0.15, dilation=2, iterations=50)
    for out, inp in (("MODEL", "model"), ("CLIP", "clip"), ("VAE", "vae")):
        g.link(ck, out, train, inp)
    g.link(reward, "reward", train, "reward")
    cmp_ = g.add("FocusFixCompare", (820, 0))
    g.link(train, "before", cmp_, "before")
    g.link(train, "after", cmp_, "after")
    g.link(train, "mask", cmp_, "mask")
    g.link(reward, "reward", cmp_, "reward")
    _preview(g, cmp_, "grid", (1150, -150), "before | after | change")
    _text(g, cmp_, "text", (1450, -150), "Numbers")
    _preview(g, train, "curve", (1150, 150), "Training curves")
    _save(g, train, (820, 450), "focusfix/aesthetic_safety_fix")
    return g.ui()


WORKFLOWS = {
    "focusfix_1_fix_painted_region": fix_painted_region,
    "focusfix_2_fix_what_reward_dislikes": fix_what_reward_dislikes,
    "focusfix_3_separate_and_enhance": separate_and_enhance,
    "focusfix_4_inspect_attention": inspect_attention,
    "focusfix_5_fix_with_aesthetic_safety": fix_with_aesthetic_safety,
}


def build_all() -> dict[str, tuple[dict, dict]]:
    """{name: (ui, api)} for every shipped workflow."""
    specs = all_specs()
    out = {}
    for name, fn in WORKFLOWS.items():
        ui = fn(specs)
        out[name] = (ui, wt.ui_to_api(ui, specs))
    return out


def dumps(obj) -> str:
    return json.dumps(obj, indent=1, ensure_ascii=False) + "\n"


if __name__ == "__main__":
    folder = REPO / "workflows"
    (folder / "api").mkdir(parents=True, exist_ok=True)
    for name, (ui, api) in build_all().items():
        (folder / f"{name}.json").write_text(dumps(ui))
        (folder / "api" / f"{name}.json").write_text(dumps(api))
        print(f"wrote workflows/{name}.json and workflows/api/{name}.json")
