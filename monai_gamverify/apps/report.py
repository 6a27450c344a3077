"""A self-contained HTML report: one file, no network (PNG figures as base64 data URIs, inline CSS, no script).

:class:`Report` collects a title, key figures and sections (text, figures, tables from pandas DataFrames) and writes
``report.html`` atomically; :func:`build_report` does it in one call. Any command that writes PNGs and tables
(``gamverify demo``, ``verify``, ``energy``) can reuse it. Everything that comes from data is HTML-escaped.

Example:
    >>> rep = Report("Suitability report", subtitle="synthetic SOS cohort")
    >>> rep.key_figures({"verifier ROC AUC": 0.98, "rejected chin volumes": "8 / 8"})
    >>> sec = rep.section("Verification", "Random-Forest verifier on Grad-CAM similarity features.")
    >>> sec.add_figure("verify/roc.png", "ROC curve, out-of-fold")
    >>> sec.add_table(pd.read_csv("verify/summary.csv"), "per-label feature statistics")
    >>> rep.write("out/report.html")
"""

from __future__ import annotations

import base64
import html
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

from monai_gamverify.io import atomic_path

__all__ = [
    "Report",
    "Section",
    "build_report",
    "png_data_uri",
    "external_references",
    "find_chromium",
    "screenshot",
    "PNG_SIGNATURE",
]

#: the first eight bytes of every PNG file
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

_CSS = """
body{font-family:-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:0;background:#f4f5f7;color:#1d2330}
header{background:#1f3a5f;color:#fff;padding:18px 32px}
header h1{margin:0 0 4px 0;font-size:24px}
header p{margin:0;opacity:.85;font-size:14px}
main{padding:8px 32px 40px 32px;max-width:1400px}
section{background:#fff;border-radius:6px;padding:12px 20px 16px 20px;margin:18px 0;box-shadow:0 1px 3px #0002}
h2{font-size:19px;border-bottom:2px solid #1f3a5f;padding-bottom:4px}
h3{font-size:15px;margin:14px 0 6px 0}
.kf{display:flex;flex-wrap:wrap;gap:10px}
.kf div{background:#eef3fa;border-left:4px solid #1f3a5f;padding:6px 12px;min-width:150px}
.kf b{display:block;font-size:18px}
.kf span{font-size:12px;color:#445}
.ok{color:#146c2e}.bad{color:#a01c1c}
figure{display:inline-block;margin:8px 12px 8px 0;vertical-align:top}
figure img{max-width:100%;border:1px solid #ccd}
figcaption{font-size:12px;color:#445;max-width:640px}
table{border-collapse:collapse;font-size:12px;margin:6px 0 12px 0}
th,td{border:1px solid #ccd;padding:3px 7px;text-align:left;vertical-align:top}
th{background:#e6ebf2}
pre{background:#f6f8fa;padding:8px;font-size:12px;white-space:pre-wrap}
p.note{font-size:12px;color:#555}
footer{font-size:11px;color:#667;padding:0 32px 24px 32px}
"""


def png_data_uri(png: str | os.PathLike | bytes) -> str:
    """A PNG file (or its bytes) as a ``data:image/png;base64,...`` URI.

    Args:
        png: path of a PNG file, or the PNG bytes.

    Returns:
        The data URI.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the content is not a PNG (names the file).

    Example:
        >>> png_data_uri("roc.png")[:22]
        'data:image/png;base64,'
    """
    if isinstance(png, (bytes, bytearray)):
        data, where = bytes(png), "the given bytes"
    else:
        path = Path(png)
        if not path.is_file():
            raise FileNotFoundError(f"figure not found: {path}")
        data, where = path.read_bytes(), str(path)
    if not data.startswith(PNG_SIGNATURE):
        raise ValueError(f"{where} is not a PNG file (only PNG figures are embedded)")
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


_URL_ATTRS = frozenset({"src", "href", "srcset", "poster", "action", "data", "background", "formaction", "manifest"})
_CSS_URL = re.compile(r"""url\(\s*["']?([^"')\s]+)""", re.I)
_IMPORT = re.compile(r"""@import\s+["']([^"']+)""", re.I)  # the url(...) form is caught by _CSS_URL


class _RefCollector(HTMLParser):
    """Collects URL-bearing attributes, inline-style and ``<style>`` ``url()``/``@import`` references."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.refs: list[str] = []
        self._in_style = False

    def _css(self, text: str) -> None:
        self.refs += [m.group(1) for rx in (_CSS_URL, _IMPORT) for m in rx.finditer(text)]

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if value is None:
                continue
            if name.lower() in _URL_ATTRS:
                if name.lower() == "srcset":  # "url 1x, url 2x": candidates end at a comma followed by space
                    self.refs += [c.split()[0] for c in re.split(r",\s+", value.strip()) if c.strip()]
                else:
                    self.refs.append(value.strip())
            elif name.lower() == "style":
                self._css(value)
        self._in_style = tag.lower() == "style"

    def handle_endtag(self, tag: str) -> None:
        if tag.lower() == "style":
            self._in_style = False

    def handle_data(self, data: str) -> None:
        if self._in_style:
            self._css(data)


def external_references(text: str) -> list[str]:
    """Resources an HTML page would fetch: URL attributes of tags (``src``, ``href``, ``srcset``, ...), CSS
    ``url()`` and ``@import`` (in ``<style>`` and ``style=``) that are not ``data:`` URIs or in-page anchors.

    Text content is not scanned (an escaped ``src=`` in a paragraph fetches nothing).

    Args:
        text: HTML source.

    Returns:
        The offending references, in order of appearance (empty for a self-contained page).

    Example:
        >>> external_references('<img src="data:image/png;base64,AA"><a href="#top">top</a>')
        []
    """
    parser = _RefCollector()
    parser.feed(text)
    parser.close()
    return [r for r in parser.refs if not r.lower().startswith("data:") and not r.startswith("#")]


def _fmt(value: Any, digits: int = 3) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        if abs(value) >= 100:
            return f"{value:.1f}"
        return f"{value:.{digits}g}" if abs(value) < 1e-3 and value != 0 else f"{value:.{digits}f}"
    return str(value)


@dataclass
class Section:
    """One section of a :class:`Report`: a heading followed by blocks (text, figures, tables) in order.

    Attributes:
        title: the heading.
        blocks: rendered HTML blocks (use the ``add_*`` methods).
    """

    title: str
    blocks: list[str] = field(default_factory=list)

    def add_heading(self, text: str) -> Section:
        """Add a sub-heading."""
        self.blocks.append(f"<h3>{html.escape(str(text))}</h3>")
        return self

    def add_text(self, text: str, pre: bool = False, note: bool = False) -> Section:
        """Add text: paragraphs separated by blank lines (escaped), or a preformatted block (``pre=True``).

        Args:
            text: the text.
            pre: keep line breaks and spacing (monospace), e.g. a printed summary.
            note: small grey print (for remarks and caveats).

        Returns:
            The section (calls chain).
        """
        if pre:
            self.blocks.append(f"<pre>{html.escape(str(text))}</pre>")
            return self
        cls = ' class="note"' if note else ""
        for para in re.split(r"\n\s*\n", str(text).strip()):
            if para.strip():
                self.blocks.append(f"<p{cls}>{html.escape(para.strip())}</p>")
        return self

    def add_list(self, items: Sequence[str]) -> Section:
        """Add a bulleted list (each item escaped)."""
        lis = "".join(f"<li>{html.escape(str(i))}</li>" for i in items)
        self.blocks.append(f"<ul>{lis}</ul>")
        return self

    def add_figure(
        self, png: str | os.PathLike | bytes, caption: str | None = None, width: int | None = None
    ) -> Section:
        """Embed a PNG (path or bytes) as a data URI, with an optional caption.

        Args:
            png: the PNG file or bytes.
            caption: text under the figure (escaped; also the ``alt`` text).
            width: display width in pixels (default: the image's own).

        Returns:
            The section.

        Raises:
            FileNotFoundError, ValueError: see :func:`png_data_uri`.
        """
        uri = png_data_uri(png)
        alt = html.escape(caption or (Path(png).name if not isinstance(png, (bytes, bytearray)) else "figure"))
        style = f' style="width:{int(width)}px"' if width else ""
        cap = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
        self.blocks.append(f'<figure><img src="{uri}" alt="{alt}"{style}>{cap}</figure>')
        return self

    def add_table(
        self, df: Any, caption: str | None = None, max_rows: int = 200, digits: int = 3, index: bool = False
    ) -> Section:
        """Add a pandas DataFrame as an HTML table (cells escaped; floats rounded to ``digits`` significant places).

        Args:
            df: the DataFrame (a mapping or a list of records is converted).
            caption: text above the table (escaped).
            max_rows: rows shown; a note says how many were left out.
            digits: digits of floats.
            index: show the index.

        Returns:
            The section.
        """
        import pandas as pd

        if not isinstance(df, pd.DataFrame):
            df = pd.DataFrame(df)
        shown = df.head(max_rows)
        body = shown.to_html(
            index=index, escape=True, border=0, na_rep="n/a", formatters=None, float_format=lambda v: _fmt(v, digits)
        )
        cap = f"<h3>{html.escape(caption)}</h3>" if caption else ""
        more = f'<p class="note">{len(df) - max_rows} more rows in the CSV file.</p>' if len(df) > max_rows else ""
        self.blocks.append(cap + body + more)
        return self


@dataclass
class Report:
    """Builder of a self-contained HTML report.

    Attributes:
        title: page title.
        subtitle: line under the title.
        figures: key figures shown at the top (label -> value).
        verdicts: (subject, verdict text, good) lines shown at the top.
        sections: the sections, in order.
    """

    title: str
    subtitle: str | None = None
    figures: dict[str, Any] = field(default_factory=dict)
    verdicts: list[tuple[str, str, bool]] = field(default_factory=list)
    sections: list[Section] = field(default_factory=list)

    def key_figures(self, figures: Mapping[str, Any]) -> Report:
        """Add key figures (label -> value) to the summary box at the top."""
        self.figures.update(figures)
        return self

    def verdict(self, subject: str, text: str, good: bool) -> Report:
        """Add a verdict line to the summary (green when ``good``, red otherwise)."""
        self.verdicts.append((str(subject), str(text), bool(good)))
        return self

    def section(self, title: str, text: str | None = None) -> Section:
        """Append a new section (with an optional introductory text) and return it."""
        sec = Section(str(title))
        if text:
            sec.add_text(text)
        self.sections.append(sec)
        return sec

    def render(self) -> str:
        """The complete HTML page as a string."""
        esc = html.escape
        parts = [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f"<title>{esc(self.title)}</title><style>{_CSS}</style></head><body>",
            f"<header><h1>{esc(self.title)}</h1>"
            + (f"<p>{esc(self.subtitle)}</p>" if self.subtitle else "")
            + "</header>",
            "<main>",
        ]
        if self.figures or self.verdicts:
            parts.append('<section id="summary"><h2>Summary</h2>')
            if self.verdicts:
                rows = "".join(
                    f'<tr><td>{esc(s)}</td><td class="{"ok" if g else "bad"}">{esc(t)}</td></tr>'
                    for s, t, g in self.verdicts
                )
                parts.append(f"<table><tr><th>subject</th><th>verdict</th></tr>{rows}</table>")
            if self.figures:
                cells = "".join(
                    f"<div><b>{esc(_fmt(v))}</b><span>{esc(str(k))}</span></div>" for k, v in self.figures.items()
                )
                parts.append(f'<div class="kf">{cells}</div>')
            parts.append("</section>")
        if len(self.sections) > 1:
            toc = "".join(f'<li><a href="#s{i}">{esc(s.title)}</a></li>' for i, s in enumerate(self.sections))
            parts.append(f"<section><h2>Contents</h2><ol>{toc}</ol></section>")
        for i, sec in enumerate(self.sections):
            parts.append(f'<section id="s{i}"><h2>{esc(sec.title)}</h2>{"".join(sec.blocks)}</section>')
        stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        parts.append(f"</main><footer>monai-gamverify report, {esc(stamp)}; self-contained (no network).</footer>")
        parts.append("</body></html>")
        page = "\n".join(parts)
        bad = external_references(page)
        if bad:  # only escaped data reaches the page, so this would be a bug here
            raise RuntimeError(f"report would reference external resources: {bad[:5]}")
        return page

    def write(self, path: str | os.PathLike) -> Path:
        """Write the page atomically (UTF-8) and return the path."""
        out = Path(path)
        page = self.render()
        with atomic_path(out) as tmp:
            tmp.write_text(page, encoding="utf-8")
        return out


def build_report(
    out_dir: str | os.PathLike,
    title: str,
    sections: Sequence[Mapping[str, Any] | Section],
    *,
    subtitle: str | None = None,
    key_figures: Mapping[str, Any] | None = None,
    verdicts: Sequence[tuple[str, str, bool]] = (),
    filename: str = "report.html",
) -> Path:
    """Write ``out_dir/filename`` from plain data in one call.

    Args:
        out_dir: report directory (created).
        title: page title.
        sections: :class:`Section` objects or dicts ``{"title", "text", "figures": [path | (path, caption)],
            "tables": [DataFrame | (DataFrame, caption)], "pre": str}`` (text, then figures, tables, ``pre``).
        subtitle: line under the title.
        key_figures: label -> value shown at the top.
        verdicts: (subject, verdict, good) lines shown at the top.
        filename: the HTML file name.

    Returns:
        The written path.

    Example:
        >>> build_report("out", "Verification", [{"title": "ROC", "figures": [("out/roc.png", "pooled ROC")]}])
        PosixPath('out/report.html')
    """
    rep = Report(title, subtitle=subtitle)
    if key_figures:
        rep.key_figures(key_figures)
    for subject, text, good in verdicts:
        rep.verdict(subject, text, good)
    for spec in sections:
        if isinstance(spec, Section):
            rep.sections.append(spec)
            continue
        if not isinstance(spec, Mapping) or "title" not in spec:
            raise ValueError(f"a section must be a Section or a dict with a 'title', got {spec!r}")
        sec = rep.section(spec["title"], spec.get("text"))
        for fig in spec.get("figures", []):
            path, cap = fig if isinstance(fig, (tuple, list)) else (fig, None)
            sec.add_figure(path, cap)
        for tab in spec.get("tables", []):
            df, cap = tab if isinstance(tab, (tuple, list)) else (tab, None)
            sec.add_table(df, cap)
        if spec.get("pre"):
            sec.add_text(spec["pre"], pre=True)
    return rep.write(Path(out_dir) / filename)


_CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    """Path of a Chromium/Chrome executable on ``PATH`` (``$CHROMIUM`` first), or ``None``.

    Returns:
        The executable's path, or ``None`` when none is installed.

    Example:
        >>> find_chromium()
        '/usr/bin/chromium'
    """
    import shutil

    for name in (os.environ.get("CHROMIUM"), *_CHROMIUM_NAMES):
        if name and (path := shutil.which(name)):
            return path
    return None


def screenshot(
    html_path: str | os.PathLike,
    png_path: str | os.PathLike,
    width: int = 1280,
    height: int = 4000,
    timeout: float = 120.0,
    chromium: str | None = None,
) -> tuple[Path, str]:
    """Render a local HTML file with headless Chromium, with the network cut off, and save a PNG screenshot.

    Every host name resolves to nothing and every request goes to a proxy that does not exist, so a page that
    needs the network shows it (broken images, ``net::ERR_*`` lines in the log) instead of fetching anything.

    Args:
        html_path: the page.
        png_path: the screenshot to write.
        width: window width in pixels.
        height: window height in pixels (the screenshot covers the window).
        timeout: seconds before Chromium is stopped.
        chromium: executable (default: :func:`find_chromium`).

    Returns:
        (screenshot path, Chromium's log output).

    Raises:
        FileNotFoundError: no Chromium, or no page.
        RuntimeError: Chromium failed or wrote no screenshot (the log is in the message).

    Example:
        >>> png, log = screenshot("demo_out/report.html", "report.png")
    """
    import subprocess
    import tempfile

    exe = chromium or find_chromium()
    if exe is None:
        raise FileNotFoundError("no Chromium found (apt-get install chromium, or set $CHROMIUM)")
    page, png = Path(html_path).resolve(), Path(png_path).resolve()
    if not page.is_file():
        raise FileNotFoundError(f"page not found: {page}")
    png.parent.mkdir(parents=True, exist_ok=True)
    png.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="gv-chromium-") as profile:
        cmd = [
            exe,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--disable-extensions",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--proxy-server=http://127.0.0.1:9",
            "--host-resolver-rules=MAP * ~NOTFOUND",
            "--hide-scrollbars",
            "--enable-logging=stderr",
            "--v=0",
            f"--user-data-dir={profile}",
            f"--window-size={int(width)},{int(height)}",
            f"--screenshot={png}",
            page.as_uri(),
        ]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired as err:
            raise RuntimeError(f"Chromium did not finish within {timeout:.0f} s") from err
    log = (proc.stdout or "") + (proc.stderr or "")
    if proc.returncode != 0 or not png.is_file():
        raise RuntimeError(f"Chromium failed (exit {proc.returncode}) on {page}:\n{log[-2000:]}")
    return png, log
