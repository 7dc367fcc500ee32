"""A small document model rendered two ways: Markdown (plots linked) and self-contained HTML (plots
embedded as base64 PNG)."""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_CSS = """
body { font-family: system-ui, sans-serif; max-width: 60rem; margin: 2rem auto; padding: 0 1rem; color: #222; }
table { border-collapse: collapse; margin: 0.5rem 0 1rem; }
th, td { border: 1px solid #ccc; padding: 0.25rem 0.6rem; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
pre { background: #f6f6f6; padding: 0.8rem; overflow-x: auto; }
img { max-width: 100%; }
.warning { color: #a33; }
"""


@dataclass
class Document:
    title: str
    blocks: list[tuple[str, Any]] = field(default_factory=list)

    def heading(self, text: str) -> None:
        self.blocks.append(("heading", text))

    def paragraph(self, text: str) -> None:
        self.blocks.append(("paragraph", text))

    def items(self, items: list[str], warning: bool = False) -> None:
        self.blocks.append(("warnings" if warning else "items", items))

    def table(self, header: list[str], rows: list[list[Any]]) -> None:
        self.blocks.append(("table", (header, rows)))

    def code(self, text: str, language: str = "") -> None:
        self.blocks.append(("code", (text, language)))

    def image(self, path: Path, caption: str, relative_to: Path) -> None:
        self.blocks.append(("image", (path, caption, relative_to)))

    def markdown(self) -> str:
        out = [f"# {self.title}", ""]
        for kind, value in self.blocks:
            if kind == "heading":
                out += [f"## {value}", ""]
            elif kind == "paragraph":
                out += [value, ""]
            elif kind in ("items", "warnings"):
                out += [f"- {item}" for item in value] + [""]
            elif kind == "table":
                header, rows = value
                out.append("| " + " | ".join(_md_cell(h) for h in header) + " |")
                out.append("|" + "---|" * len(header))
                out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
                out.append("")
            elif kind == "code":
                text, language = value
                out += [f"```{language}", text.rstrip("\n"), "```", ""]
            elif kind == "image":
                path, caption, base = value
                out += [f"![{caption}]({path.relative_to(base).as_posix()})", ""]
        return "\n".join(out)

    def html(self) -> str:
        out = [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            f"<title>{html.escape(self.title)}</title><style>{_CSS}</style></head><body>",
            f"<h1>{html.escape(self.title)}</h1>",
        ]
        for kind, value in self.blocks:
            if kind == "heading":
                out.append(f"<h2>{html.escape(value)}</h2>")
            elif kind == "paragraph":
                out.append(f"<p>{html.escape(value)}</p>")
            elif kind in ("items", "warnings"):
                css = ' class="warning"' if kind == "warnings" else ""
                out.append(f"<ul{css}>" + "".join(f"<li>{html.escape(i)}</li>" for i in value) + "</ul>")
            elif kind == "table":
                header, rows = value
                head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
                body = "".join(
                    "<tr>" + "".join(f"<td>{html.escape(_text(c))}</td>" for c in row) + "</tr>"
                    for row in rows
                )
                out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
            elif kind == "code":
                out.append(f"<pre><code>{html.escape(value[0])}</code></pre>")
            elif kind == "image":
                path, caption, _ = value
                data = base64.b64encode(path.read_bytes()).decode("ascii")
                out.append(
                    f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
                    f"<figcaption>{html.escape(caption)}</figcaption></figure>"
                )
        out.append("</body></html>")
        return "\n".join(out) + "\n"


def _text(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return "-" if value is None else str(value)


def _md_cell(value: Any) -> str:
    return _text(value).replace("|", "\\|").replace("\n", " ")
