"""Rendering a :class:`Report`: one self-contained HTML page, and Markdown with the figures beside it."""

from __future__ import annotations

import base64
import html

import numpy as np
import pandas as pd

from polypflow.report.sections import Report


def fmt(value: object) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "—"
    if isinstance(value, (float, np.floating)):
        return f"{value:.4f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def html_table(frame: pd.DataFrame, caption: str) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    body = "".join("<tr>" + "".join(f"<td class='{cell_class(c, v)}'>{html.escape(fmt(v))}</td>" for c, v in row.items())
                   + "</tr>" for _, row in frame.iterrows())
    cap = f"<caption>{html.escape(caption)}</caption>" if caption else ""
    return f"<div class='scroll'><table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>"


def cell_class(column: str, value: object) -> str:
    if column == "significant":
        return "sig" if value == "yes" else "nonsig"
    return "num" if isinstance(value, (int, float, np.number)) else ""


CSS = """body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1400px;
padding:0 1em;color:#222}h1{border-bottom:2px solid #444}h2{margin-top:2em;border-bottom:1px solid #bbb}
table{border-collapse:collapse;font-size:12px;margin:0.5em 0 1em}th,td{border:1px solid #ccc;padding:3px 6px}
th{background:#f0f0f0;position:sticky;top:0}td.num{text-align:right;font-variant-numeric:tabular-nums}
td.sig{background:#d7f5d7;font-weight:bold}td.nonsig{color:#777}caption{text-align:left;font-weight:bold;
padding:4px 0}.scroll{overflow:auto;max-width:100%;max-height:34em;border:1px solid #eee}
.summary{background:#f7f9fc;border:1px solid #cdd6e4;padding:0.2em 1em 0.6em;margin:1em 0}figure{display:inline-block;margin:0.5em;vertical-align:top}
figure img{max-width:100%;border:1px solid #ddd}figcaption{font-size:12px;color:#444;max-width:640px}
nav a{margin-right:1em}"""


def to_html(report: Report) -> str:
    """One self-contained page: inline CSS, figures as base64 PNG, no scripts."""
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(report.title)}</title>"
             f"<style>{CSS}</style></head><body><h1>{html.escape(report.title)}</h1><nav>"]
    parts += [f"<a href='#s{i}'>{html.escape(s.title)}</a>" for i, s in enumerate(report.sections)]
    parts.append("</nav>")
    for i, section in enumerate(report.sections):
        boxed = section.boxed
        parts.append(("<div class='summary'>" if boxed else "") + f"<h2 id='s{i}'>{html.escape(section.title)}</h2>")
        for block in section.blocks:
            if block[0] == "text":
                parts.append(f"<p>{html.escape(block[1])}</p>")
            elif block[0] == "table":
                parts.append(html_table(block[1], block[2]))
            else:
                data = base64.b64encode(block[2]).decode()
                parts.append(f"<figure><img alt='{html.escape(block[1])}' src='data:image/png;base64,{data}'>"
                             f"<figcaption>{html.escape(block[3])}</figcaption></figure>")
        if boxed:
            parts.append("</div>")
    parts.append("</body></html>")
    return "\n".join(parts)


def md_table(frame: pd.DataFrame, caption: str) -> str:
    cell = lambda v: fmt(v).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    lines = [f"**{caption}**", ""] if caption else []
    lines += ["| " + " | ".join(cell(c) for c in frame.columns) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def to_markdown(report: Report, figure_dir: str) -> tuple[str, dict[str, bytes]]:
    """Markdown of the same sections; figures are returned as ``{relative path: png}`` to write beside it."""
    lines, files = [f"# {report.title}", ""], {}
    for section in report.sections:
        lines += [f"## {section.title}", ""]
        for block in section.blocks:
            if block[0] == "text":
                lines.append(block[1])
            elif block[0] == "table":
                lines.append(md_table(block[1], block[2]))
            else:
                path = f"{figure_dir}/{block[1]}.png"
                files[path] = block[2]
                lines.append(f"![{block[3]}]({path})  \n*{block[3]}*")
            lines.append("")
    return "\n".join(lines), files
