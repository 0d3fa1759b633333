"""Reading the HTML feature pages back with the standard library's parser (what the tests check)."""

from __future__ import annotations

from dataclasses import dataclass, field
from html.parser import HTMLParser

_VOID = {"meta", "br", "img", "link", "input", "hr"}


@dataclass
class Row:
    cls: str
    attrs: dict[str, str]
    cells: list[str] = field(default_factory=list)
    spans: list[dict[str, str]] = field(default_factory=list)  # token spans of a context cell, with their text
    links: list[str] = field(default_factory=list)


@dataclass
class Page:
    title: str = ""
    h1: str = ""
    links: list[str] = field(default_factory=list)
    rows: list[Row] = field(default_factory=list)
    bars: list[dict[str, str]] = field(default_factory=list)  # histogram rects
    svgs: int = 0


class _Parser(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.page = Page()
        self.stack: list[str] = []
        self.row: Row | None = None
        self.span: dict[str, str] | None = None
        self.cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag not in _VOID:
            self.stack.append(tag)
        if tag == "a":
            self.page.links.append(a.get("href", ""))
            if self.row is not None:
                self.row.links.append(a.get("href", ""))
        elif tag == "tr" and a.get("class"):
            self.row = Row(a["class"], a)
        elif tag == "td" and self.row is not None:
            self.cell = []
        elif tag == "span" and self.row is not None:
            self.span = {**a, "text": ""}
        elif tag == "rect":
            self.page.bars.append(a)
        elif tag == "svg":
            self.page.svgs += 1

    def handle_endtag(self, tag: str) -> None:
        if self.stack:
            self.stack.pop()
        if tag == "span" and self.span is not None and self.row is not None:
            self.row.spans.append(self.span)
            self.span = None
        elif tag == "td" and self.cell is not None and self.row is not None:
            self.row.cells.append("".join(self.cell))
            self.cell = None
        elif tag == "tr" and self.row is not None:
            self.page.rows.append(self.row)
            self.row = None

    def handle_data(self, data: str) -> None:
        top = self.stack[-1] if self.stack else ""
        if top == "title":
            self.page.title += data
        elif top == "h1":
            self.page.h1 += data
        if self.span is not None:
            self.span["text"] += data
        if self.cell is not None:
            self.cell.append(data)


def parse(text: str) -> Page:
    p = _Parser()
    p.feed(text)
    p.close()
    assert not p.stack, f"unclosed tags: {p.stack}"
    return p.page
