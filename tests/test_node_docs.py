"""Every node's help page (web/docs/<node id>.md, which ComfyUI's frontend shows in its node help panel) lists the
node's real inputs and outputs, with the schema's types, defaults and ranges; without ComfyUI.

Page convention (what these tests read): the first line is `# <display name>`; under `## Inputs` (split into
`### Required` and `### Optional` when the node has optional inputs) and `## Outputs`, every top-level list item is
one input or output, in the node's order, written as

    - `name` (TYPE; default VALUE; MIN to MAX): what it means

TYPE is the schema's type (MODEL, INT, FOCUSFIX_REWARD, ...), or `choice` for a list widget (`choice: a / b / c`
lists its values). VALUE is a number, `on`/`off`, `empty`, a `backticked` text, or a choice. The parts after TYPE
are optional except that a number, text or yes/no widget states its default; whatever is stated must match.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
from pack_loader import REPO, load_pack

PACK = load_pack()
NODES = sorted(PACK.NODE_CLASS_MAPPINGS.items())
WEB = REPO / getattr(PACK, "WEB_DIRECTORY", "web")  # a missing WEB_DIRECTORY fails its own test below
DOCS = WEB / "docs"
WORKFLOWS = sorted((REPO / "workflows").glob("*.json"))
WIDGETS = ("INT", "FLOAT", "STRING", "BOOLEAN")
SECTIONS = ("Inputs", "Outputs", "Typical wiring", "Common errors")

ENTRY = re.compile(r"^[-*] `([^`]+)` \(([^)]*)\):")   # - `name` (TYPE; ...): text
RANGE = re.compile(r"(-?[0-9][0-9.e+-]*) to (-?[0-9][0-9.e+-]*)")


def _page(node_id: str) -> str:
    return (DOCS / f"{node_id}.md").read_text(encoding="utf-8")


def _sections(text: str) -> dict[str, str]:
    """`## Heading` -> the text up to the next `## ` heading."""
    out, name = {}, None
    for line in text.splitlines():
        if line.startswith("## "):
            name = line[3:].strip()
            out[name] = ""
        elif name is not None:
            out[name] += line + "\n"
    return out


def _entries(section: str, where: str) -> dict[str, list[tuple[str, str]]]:
    """`### Group` -> [(name, parenthesis)] of its top-level list items ("" = items before any `###`). Every
    top-level item must be an entry: a name written another way (bold, plain) would escape the checks."""
    groups, group = {"": []}, ""
    for line in section.splitlines():
        if line.startswith("### "):
            group = line[4:].strip()
            groups[group] = []
        elif re.match(r"^[-*] ", line):
            m = ENTRY.match(line)
            assert m, f"{where}: a list item that is not '- `name` (TYPE...): ...': {line!r}"
            groups[group].append((m[1], m[2]))
    return {g: e for g, e in groups.items() if e or g}


def _parts(paren: str) -> tuple[str, list[str] | None, str | None, tuple[float, float] | None]:
    """'choice: a / b; default a; 1 to 2' -> ('choice', ['a', 'b'], 'a', (1.0, 2.0))."""
    kind, *rest = [p.strip() for p in paren.split(";")]
    choices = None
    if kind.startswith("choice:"):
        kind, choices = "choice", [c.strip() for c in kind[len("choice:"):].split("/")]
    default = next((p[len("default "):].strip() for p in rest if p.startswith("default ")), None)
    span = next((RANGE.fullmatch(p) for p in rest if RANGE.fullmatch(p)), None)
    return kind, choices, default, None if span is None else (float(span[1]), float(span[2]))


def _same_default(text: str, kind: str, value) -> bool:
    if kind == "BOOLEAN":
        return text == ("on" if value else "off")
    if kind == "STRING":
        return (text == "empty" and value == "") or text == f"`{value}`"
    if kind == "choice":
        return text == str(value)
    try:
        return math.isclose(float(text), float(value), rel_tol=1e-9, abs_tol=1e-12)
    except ValueError:
        return False


def _check_input(node_id: str, name: str, paren: str, spec: tuple) -> None:
    kind, choices, default, span = _parts(paren)
    options = spec[1] if len(spec) > 1 else {}
    real = "choice" if isinstance(spec[0], list) else spec[0]
    where = f"web/docs/{node_id}.md input `{name}`"
    assert kind == real, f"{where}: type {kind!r}, but the node's is {real!r}"
    if choices is not None:
        assert choices == list(spec[0]), f"{where}: lists {choices}, but the node offers {list(spec[0])}"
    expected = options.get("default", spec[0][0] if real == "choice" and spec[0] else None)
    if default is None:
        assert real not in WIDGETS, f"{where}: state its default (default {expected!r})"
    else:
        assert expected is not None, f"{where}: states default {default!r}, but the node has none"
        assert _same_default(default, real, expected), f"{where}: default {default!r}, but the node's is {expected!r}"
    if span is not None:
        assert span == (options.get("min"), options.get("max")), \
            f"{where}: range {span}, but the node's is {(options.get('min'), options.get('max'))}"
    elif real in ("INT", "FLOAT") and "max" in options and options["max"] < 2 ** 32:  # not seeds' 64-bit range
        assert False, f"{where}: state its range ({options.get('min')} to {options['max']})"


def test_every_node_has_a_page_and_every_page_a_node():
    pages, ids = {p.stem for p in DOCS.glob("*.md")}, set(PACK.NODE_CLASS_MAPPINGS)
    assert pages >= ids, f"no page for {sorted(ids - pages)}"
    assert pages <= ids, f"pages of no node (renamed?): {sorted(pages - ids)}"


def test_web_directory_is_exported_and_holds_the_docs():
    """ComfyUI serves the root module's WEB_DIRECTORY under /extensions/<pack folder>/, where the frontend looks
    for docs/<node id>.md."""
    assert "WEB_DIRECTORY" in PACK.__all__
    web = (REPO / PACK.WEB_DIRECTORY).resolve()
    assert web.is_dir() and web.is_relative_to(REPO), web
    assert (web / "docs").is_dir()


@pytest.mark.parametrize("node_id, cls", NODES)
def test_page_title_and_sections(node_id, cls):
    text = _page(node_id)
    assert text.splitlines()[0] == f"# {PACK.NODE_DISPLAY_NAME_MAPPINGS[node_id]}", "first line: # <display name>"
    found = [s for s in _sections(text) if s in SECTIONS]
    assert found == list(SECTIONS), f"web/docs/{node_id}.md: sections {found}, expected {list(SECTIONS)} in order"


@pytest.mark.parametrize("node_id, cls", NODES)
def test_inputs_are_the_nodes(node_id, cls):
    """Every required and optional input is listed, in its group and order, and nothing else is: a renamed,
    added or removed input fails here. Types, defaults and ranges are the schema's."""
    spec = cls.INPUT_TYPES()
    required, optional = dict(spec.get("required", {})), dict(spec.get("optional", {}))
    groups = _entries(_sections(_page(node_id)).get("Inputs", ""), f"web/docs/{node_id}.md Inputs")
    if optional:
        assert set(groups) == {"Required", "Optional"}, f"web/docs/{node_id}.md: Inputs needs '### Required' and " \
                                                       f"'### Optional' (and nothing else), got {list(groups)}"
    listed = {"required": [n for n, _ in groups.get("Required", groups.get("", []))],
              "optional": [n for n, _ in groups.get("Optional", [])]}
    for group, real in (("required", required), ("optional", optional)):
        unknown = [n for n in listed[group] if n not in real]
        assert not unknown, f"web/docs/{node_id}.md lists {group} inputs the node does not have: {unknown}"
        missing = [n for n in real if n not in listed[group]]
        assert not missing, f"web/docs/{node_id}.md does not list the {group} inputs {missing}"
        assert listed[group] == list(real), f"web/docs/{node_id}.md: {group} inputs not in the node's order"
    for name, paren in [e for g in groups.values() for e in g]:
        _check_input(node_id, name, paren, {**required, **optional}[name])


@pytest.mark.parametrize("node_id, cls", NODES)
def test_outputs_are_the_nodes(node_id, cls):
    groups = _entries(_sections(_page(node_id)).get("Outputs", ""), f"web/docs/{node_id}.md Outputs")
    listed = [e for g in groups.values() for e in g]
    assert [n for n, _ in listed] == list(cls.RETURN_NAMES), \
        f"web/docs/{node_id}.md Outputs: {[n for n, _ in listed]}, but RETURN_NAMES is {list(cls.RETURN_NAMES)}"
    for (name, paren), kind in zip(listed, cls.RETURN_TYPES):
        assert _parts(paren)[0] == kind, \
            f"web/docs/{node_id}.md output `{name}`: type {paren!r}, the node's is {kind!r}"


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=lambda p: p.stem)
def test_pages_name_the_workflows_that_use_their_node(workflow):
    used = {n["type"] for n in json.loads(workflow.read_text())["nodes"]} & set(PACK.NODE_CLASS_MAPPINGS)
    silent = sorted(n for n in used if workflow.name not in _page(n))
    assert not silent, f"pages of nodes {workflow.name} uses do not name it: {silent}"


@pytest.mark.parametrize("node_id, cls", NODES)
def test_named_workflows_and_linked_files_exist(node_id, cls):
    text = _page(node_id)
    for name in re.findall(r"focusfix_\d\w*\.json", text):
        assert (REPO / "workflows" / name).is_file(), \
            f"web/docs/{node_id}.md names a workflow that is not shipped: {name}"
    for target in re.findall(r"\]\(([^)\s]+)\)", text):  # links and images, relative to the page as served
        if not re.match(r"[a-z]+:", target) and not target.startswith("#"):
            assert (DOCS / target.split("#")[0]).is_file(), f"web/docs/{node_id}.md links a missing file: {target}"
