"""A static, self-contained HTML report per run: metrics tables and figures, opened in any browser."""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medistill.io.atomic import atomic_write_text


@dataclass
class Section:
    title: str
    text: str = ""
    pre: bool = False  # show text as preformatted (configs, logs)
    tables: list[tuple[list[str], list[list[object]]]] = field(default_factory=list)
    figures: list[Path] = field(default_factory=list)


def _cell(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 1000 else f"{v:.1f}"
    return html.escape(str(v))


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def markdown_table(table: dict[str, Any]) -> str:
    """An evaluation table ``{title, note, header, rows}`` (the form tasks return in ``tables`` for the
    report) as Markdown, numbers to 3 decimals: the ``eval/*.md`` files beside the HTML report."""

    def cell(v: Any) -> str:
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    lines = [f"### {table['title']}", "", table.get("note", ""), ""]
    lines += ["| " + " | ".join(table["header"]) + " |", "|---" * len(table["header"]) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in table["rows"]]
    return "\n".join(lines) + "\n"


def _img(path: Path) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode()
    caption = html.escape(Path(path).name)
    return f'<figure><img src="data:image/png;base64,{data}"><figcaption>{caption}</figcaption></figure>'


_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.2em}
td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th{background:#f3f3f3}figure{display:inline-block;margin:.5em}img{max-width:100%;border:1px solid #ddd}
figcaption{font-size:.8em;color:#666}pre{background:#f7f7f7;padding:.6em;overflow:auto}"""


def write_report(path: str | Path, title: str, sections: Sequence[Section]) -> Path:
    """Write one HTML file with figures embedded (so it can be copied or mailed alone)."""
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
        f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>",
    ]
    for s in sections:
        parts.append(f"<h2>{html.escape(s.title)}</h2>")
        if s.text:
            tag = "pre" if s.pre else "p"
            parts.append(f"<{tag}>{html.escape(s.text)}</{tag}>")
        parts.extend(_table(h, r) for h, r in s.tables)
        parts.extend(_img(f) for f in s.figures if Path(f).exists())
    parts.append("</body></html>")
    atomic_write_text(path, "\n".join(parts))
    return Path(path)
