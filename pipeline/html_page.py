"""A self-contained HTML page: headings, tables, preformatted text and PNG images embedded as data URIs,
with its style inline, so the file opens anywhere with no network and no other file beside it."""

from __future__ import annotations

import base64
import html
import numbers

import numpy as np
import pandas as pd

__all__ = ["document", "escape", "image", "preformatted", "table"]

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 72em;
       padding: 0 1em; color: #222; line-height: 1.4; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { font-size: 1.25em; margin-top: 2em; border-bottom: 1px solid #ddd; }
h3 { font-size: 1.05em; margin-top: 1.4em; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.9em; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.6em; text-align: right; vertical-align: top; }
th { background: #f4f4f4; text-align: left; }
td.text { text-align: left; } tr:nth-child(even) td { background: #fafafa; }
img { max-width: 100%; height: auto; display: block; margin: 0.8em 0; }
pre { background: #f7f7f7; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
.note { color: #555; font-size: 0.9em; }
"""


def escape(text) -> str:
    return html.escape(str(text), quote=True)


def table(frame: pd.DataFrame, floatfmt: str = "{:.3g}", index: bool = True) -> str:
    """The frame as an HTML table: numbers right-aligned (floats in `floatfmt`), text left-aligned, NaN and
    None as '–' (not applicable)."""
    shown = frame.reset_index() if index and (frame.index.name or any(frame.index.names)) else frame
    head = "".join(f"<th>{escape(column)}</th>" for column in shown.columns)
    body = []
    for row in shown.itertuples(index=False):
        cells = []
        for value in row:
            if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Number | type(None)):
                cells.append(f'<td class="text">{escape(value)}</td>')
            elif value is None or value != value:
                cells.append("<td>–</td>")
            elif isinstance(value, numbers.Integral):
                cells.append(f"<td>{int(value)}</td>")
            else:
                cells.append(f"<td>{escape(floatfmt.format(value))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def image(png: bytes, alt: str) -> str:
    """A PNG embedded in the page as a data URI."""
    return f'<img alt="{escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'


def preformatted(text: str) -> str:
    return f"<pre>{escape(text)}</pre>"


def document(title: str, sections: list[tuple[str, str]], subtitle: str = "") -> str:
    """The page: a title, an optional subtitle, then each (heading, HTML body) as a section."""
    parts = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
             '<meta name="viewport" content="width=device-width, initial-scale=1">', f"<title>{escape(title)}</title>",
             f"<style>{STYLE}</style>", "</head>", "<body>", f"<h1>{escape(title)}</h1>"]
    if subtitle:
        parts.append(f'<p class="note">{escape(subtitle)}</p>')
    for heading, body in sections:
        parts += [f"<section><h2>{escape(heading)}</h2>", body, "</section>"]
    parts += ["</body>", "</html>"]
    return "\n".join(parts) + "\n"
