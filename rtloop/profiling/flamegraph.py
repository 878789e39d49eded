"""A flame graph SVG drawn from py-spy's speedscope samples.

py-spy writes one format per recording. We record speedscope (per-thread sample lists, nothing merged)
and draw the SVG from the same samples here, so both files describe one run, not two runs that differ.
The SVG is static: a box per frame, its width the share of samples, a <title> tooltip with the count.
"""

from __future__ import annotations

import html
from collections import Counter
from dataclasses import dataclass, field

WIDTH = 1200.0
ROW = 16.0
MIN_PX = 1.0  # boxes narrower than a pixel are not drawn (their time is in their parent's tooltip)


@dataclass
class Node:
    name: str
    weight: float = 0.0
    children: dict[str, "Node"] = field(default_factory=dict)


def collapse(speedscope: dict) -> Counter[tuple[str, ...]]:
    """speedscope document -> {root-first stack of frame labels: seconds}. py-spy's --threads puts a
    `thread (tid): name` frame at the root of each stack, so threads become the first level."""
    frames = [_label(f) for f in speedscope["shared"]["frames"]]
    stacks: Counter[tuple[str, ...]] = Counter()
    for profile in speedscope["profiles"]:
        for sample, weight in zip(profile["samples"], profile["weights"]):
            stacks[tuple(frames[i] for i in sample)] += weight
    return stacks


def _label(frame: dict) -> str:
    line = frame.get("line")
    file = (frame.get("file") or "").rsplit("/", 1)[-1]
    return f"{frame['name']} ({file}:{line})" if file and line else frame["name"]


def build_tree(stacks: Counter[tuple[str, ...]]) -> Node:
    root = Node("all")
    for stack, weight in stacks.items():
        node = root
        node.weight += weight
        for name in stack:
            node = node.children.setdefault(name, Node(name))
            node.weight += weight
    return root


def render_svg(stacks: Counter[tuple[str, ...]], title: str) -> str:
    root = build_tree(stacks)
    total = root.weight or 1.0
    depth = _depth(root)
    height = (depth + 3) * ROW
    boxes: list[str] = []

    def draw(node: Node, x: float, level: int) -> None:
        w = node.weight / total * WIDTH
        if w < MIN_PX:
            return
        y = height - (level + 2) * ROW  # root at the bottom, callees above: the classic flame graph
        tip = html.escape(f"{node.name}: {node.weight:.2f} s, {100 * node.weight / total:.1f}%")
        text = html.escape(_fit(node.name, w))
        label = f'<text x="{x + 3:.1f}" y="{y + ROW - 4:.0f}">{text}</text>' if text else ""
        boxes.append(
            f'<g><title>{tip}</title><rect x="{x:.1f}" y="{y:.0f}" width="{w:.1f}" height="{ROW - 1:.0f}" '
            f'fill="{_color(node.name)}"/>{label}</g>'
        )
        for child in sorted(node.children.values(), key=lambda c: c.name):
            draw(child, x, level + 1)
            x += child.weight / total * WIDTH

    draw(root, 0.0, 0)
    return (
        f'<?xml version="1.0" encoding="UTF-8"?>\n'
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH:.0f}" height="{height:.0f}" '
        f'viewBox="0 0 {WIDTH:.0f} {height:.0f}" font-family="monospace" font-size="11">\n'
        f'<text x="4" y="14" font-size="13">{html.escape(title)} ({total:.1f} s sampled; hover for counts)</text>\n'
        + "\n".join(boxes)
        + "\n</svg>\n"
    )


def _depth(node: Node) -> int:
    return 1 + max((_depth(c) for c in node.children.values()), default=0)


def _fit(name: str, width_px: float) -> str:
    chars = int(width_px / 7) - 1  # ~7 px per monospace character at 11 px
    if chars < 3:
        return ""
    return name if len(name) <= chars else name[: chars - 2] + ".."


def _color(name: str) -> str:
    # Stable warm colours per name, so the same function has the same colour in every profile.
    h = sum(ord(c) for c in name)
    return f"rgb({205 + h % 50},{80 + (h * 7) % 120},{40 + (h * 13) % 50})"
