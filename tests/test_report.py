"""report.py: self-contained HTML (data-URI PNGs, no external resources), escaping, atomic writes, headless Chromium."""

from __future__ import annotations

import base64
import io
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from monai_gamverify.apps.report import (
    PNG_SIGNATURE,
    Report,
    build_report,
    external_references,
    find_chromium,
    png_data_uri,
    screenshot,
)


def _png(path: Path, seed: int = 0) -> Path:
    """A colourful matplotlib figure (what the package's figures are)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(seed)
    fig, ax = plt.subplots(figsize=(4, 3))
    ax.imshow(rng.random((16, 16)), cmap="jet")
    ax.plot([0, 15], [0, 15], "r-", lw=3)
    fig.savefig(path, format="png")
    plt.close(fig)
    return path


class _Tags(HTMLParser):
    """Independent collector of every tag and attribute (the stdlib parser, not the module's code)."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def _tags(text: str) -> list[tuple[str, dict]]:
    p = _Tags()
    p.feed(text)
    return p.tags


@pytest.fixture
def figures(tmp_path):
    return [_png(tmp_path / f"fig{i}.png", seed=i) for i in range(3)]


def _report(figures) -> Report:
    rep = Report("Demo <report>", subtitle="sub & title")
    rep.key_figures({"ROC AUC": 0.987654, "rejected": "8 / 8", "flag": True})
    rep.verdict("model <b>", "suitable & fine", True)
    rep.verdict("chin", "not suitable", False)
    sec = rep.section("Figures", "First paragraph.\n\nSecond <i>paragraph</i>.")
    for i, f in enumerate(figures):
        sec.add_figure(f, f"figure {i} <caption>")
    sec = rep.section("Tables")
    sec.add_table(
        pd.DataFrame({"name<x>": ["<script>alert(1)</script>", "a & b"], "value": [0.123456, float("nan")]}),
        "a <table>",
    )
    sec.add_text("printed\n  summary <pre>", pre=True)
    return rep


def test_self_contained_and_images_are_png_data_uris(tmp_path, figures):
    out = _report(figures).write(tmp_path / "r" / "report.html")
    text = out.read_text(encoding="utf-8")
    assert out.name == "report.html" and text.startswith("<!DOCTYPE html>")
    # no network resource of any kind
    assert "http://" not in text and "https://" not in text
    assert external_references(text) == []
    tags = _tags(text)
    assert not [t for t, a in tags if t in ("script", "link", "iframe", "object", "embed")]
    for tag, attrs in tags:
        for key in ("src", "href"):
            if key in attrs:
                assert attrs[key].startswith(("data:", "#")), (tag, attrs[key][:60])
    # every <img> is a PNG data URI that decodes to the very file embedded
    imgs = [a["src"] for t, a in tags if t == "img"]
    assert len(imgs) == len(figures)
    from PIL import Image

    for src, f in zip(imgs, figures):
        assert src.startswith("data:image/png;base64,")
        raw = base64.b64decode(src.split(",", 1)[1], validate=True)
        assert raw.startswith(PNG_SIGNATURE) and raw == f.read_bytes()
        assert Image.open(io.BytesIO(raw)).size == Image.open(f).size


def test_everything_from_data_is_escaped(tmp_path, figures):
    text = _report(figures).render()
    assert "<script" not in text and "alert(1)</script>" not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "name&lt;x&gt;" in text and "a &amp; b" in text
    assert "<title>Demo &lt;report&gt;</title>" in text
    assert "Second &lt;i&gt;paragraph&lt;/i&gt;." in text and "<i>" not in text
    assert "summary &lt;pre&gt;" in text
    assert "figure 0 &lt;caption&gt;" in text and "model &lt;b&gt;" in text
    # the tables are real tables: header cells and body rows
    tags = [t for t, _ in _tags(text)]
    assert tags.count("table") == 2 and tags.count("th") >= 4
    assert "0.123" in text and "0.123456" not in text and "n/a" in text


def test_write_is_atomic(tmp_path, figures, monkeypatch):
    rep = _report(figures)
    path = rep.write(tmp_path / "report.html")
    before = path.read_bytes()
    assert path.stat().st_mode & 0o044  # readable by others (umask permitting), unlike the temporary file

    real_write = Path.write_text

    def half_then_fail(self, data, *args, **kwargs):
        real_write(self, data[: len(data) // 2], *args, **kwargs)
        raise OSError("disk full")

    monkeypatch.setattr(Path, "write_text", half_then_fail)
    rep.section("more").add_text("new content")
    with pytest.raises(OSError, match="disk full"):
        rep.write(path)
    monkeypatch.undo()
    assert path.read_bytes() == before  # the old report is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["report.html"] + [f.name for f in figures])


def test_png_data_uri_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.png"):
        png_data_uri(tmp_path / "missing.png")
    fake = tmp_path / "fake.png"
    fake.write_bytes(b"GIF89a not a png")
    with pytest.raises(ValueError, match="fake.png is not a PNG"):
        png_data_uri(fake)
    with pytest.raises(ValueError, match="not a PNG"):
        Report("t").section("s").add_figure(b"\xff\xd8\xff jpeg bytes")
    assert png_data_uri(PNG_SIGNATURE + b"rest") == "data:image/png;base64," + base64.b64encode(
        PNG_SIGNATURE + b"rest"
    ).decode("ascii")


def test_external_references_finds_every_kind():
    page = (
        '<html><head><link rel="stylesheet" href="https://cdn.example/x.css">'
        "<style>@import url('https://fonts.example/f.css'); body{background:url(http://a/b.png)}</style>"
        '<script src="//cdn.example/x.js"></script></head><body>'
        '<img src="img/local.png"><img srcset="a.png 1x, data:image/png;base64,AA 2x">'
        "<div style=\"background-image: url('bg.jpg')\"></div>"
        '<a href="#s1">ok</a><img src="data:image/png;base64,AAAA">'
        "<p>text that says src=http://nothing is fine &lt;img src=x&gt;</p></body></html>"
    )
    refs = external_references(page)
    assert refs == [
        "https://cdn.example/x.css",
        "https://fonts.example/f.css",
        "http://a/b.png",
        "//cdn.example/x.js",
        "img/local.png",
        "a.png",
        "bg.jpg",
    ]


def test_build_report_from_dicts(tmp_path, figures):
    df = pd.DataFrame({"a": [1, 2], "b": ["x", "y"]})
    path = build_report(
        tmp_path / "out",
        "Verification",
        [
            {"title": "ROC", "text": "intro", "figures": [(figures[0], "pooled ROC"), figures[1]]},
            {"title": "Tables", "tables": [(df, "the table"), df], "pre": "model  P\nsos_b  0.9"},
        ],
        key_figures={"AUC": 1.0},
        verdicts=[("sos_b", "suitable", True)],
    )
    text = path.read_text()
    assert path == tmp_path / "out" / "report.html"
    assert text.count("<img ") == 2 and text.count("<table") == 3  # 2 tables + the verdict table
    assert "pooled ROC" in text and "sos_b  0.9" in text
    assert re.search(r'<td class="ok">suitable</td>', text)
    with pytest.raises(ValueError, match="title"):
        build_report(tmp_path, "x", [{"figures": []}])


@pytest.mark.skipif(find_chromium() is None, reason="chromium is not installed (apt-get install chromium)")
def test_chromium_renders_offline(tmp_path, figures):
    """The page loads in headless Chromium with the network cut off, and the screenshot shows the figures."""
    from PIL import Image

    path = _report(figures).write(tmp_path / "report.html")
    png, log = screenshot(path, tmp_path / "shot.png", width=1000, height=1800)
    # nothing was fetched or failed to load
    assert not re.search(r"ERR_[A-Z_]+|Failed to load resource|Uncaught", log), log[-1500:]
    img = np.asarray(Image.open(png).convert("RGB")).astype(int)
    assert img.shape == (1800, 1000, 3)
    assert img.std() > 20  # not a blank page
    sat = img.max(axis=2) - img.min(axis=2)
    assert (sat > 100).mean() > 0.01  # strongly coloured pixels: the embedded jet/red figures were drawn
    assert len(np.unique(img.reshape(-1, 3) // 8, axis=0)) > 200
