"""report.html: one self-contained page per inspected input, checked as data here and in a real
browser (Debian's chromium driven by Playwright; the browser tests skip, saying why, without one,
and fail instead under TFKIT_REQUIRE_BROWSER=1, as .ci/run sets it)."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import soundfile
from PIL import Image

from tfkit import page as report_page
from tfkit import run as runs
from tfkit.cli import main
from tfkit.inspect import attention_rollout
from tfkit.recipe import AttentionExample
from tfkit.recipes.forecast.data import planted


def cli(*args: str) -> None:
    try:
        main(list(args))
    except SystemExit as e:
        assert e.code in (0, None), f"tfkit {' '.join(args)} exited with {e.code}"


def sets(*items: str) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


@pytest.fixture(scope="module")
def pages(tmp_path_factory, trained_run) -> dict[str, Path]:
    """recipe → the inspect-attention folder of one tiny run of it (trained for 2 steps on data
    written here; translation is the shared trained run, so that its alignment has rows)."""
    root = tmp_path_factory.mktemp("report")
    corpus = root / "code.txt"
    corpus.write_text("\n\n".join(f"def f{i}(x):\n    return x + {i}" for i in range(200)) + "\n", encoding="utf-8")
    prose = root / "prose.txt"
    prose.write_text(
        "\n\n".join("\n".join(f"Sentence {s} of story {d} talks about item {d * s}." for s in range(5)) for d in range(30)) + "\n"
    )
    rng = np.random.default_rng(0)
    for i in range(24):
        (root / "images" / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray((rng.random((16, 16)) * 255).astype(np.uint8)).convert("RGB").save(
            root / "images" / f"c{i % 2}" / f"{i}.png"
        )
    (root / "audio").mkdir()
    for i in range(4):  # a rising chirp per file: a spectrogram with something in it
        t = np.arange(16000) / 16000
        soundfile.write(
            root / "audio" / f"u{i}.wav", (0.3 * np.sin(2 * np.pi * (300 + 400 * i * t) * t)).astype(np.float32), 16000
        )
    for split in ("train", "validation", "test"):
        (root / "audio" / f"{split}.csv").write_text(
            "audio,text\n" + "".join(f"u{i}.wav,{'one two three'[: 3 + 2 * i]}\n" for i in range(4))
        )
    planted()[0].iloc[-200:].to_csv(root / "history.csv", index=False)
    tiny = {
        "forecast": sets("data.name=planted", "model.d_model=16", "model.d_ff=32", "model.layers=1", "model.cross_variable=true"),
        "causal-lm": [
            "--data",
            str(corpus),
            *sets(
                "data.vocab_size=300",
                "data.block_size=16",
                "model.d_model=32",
                "model.heads=4",
                "model.d_ff=64",
                "model.layers=2",
                "model.max_positions=64",
                "train.batch_size=8",
            ),
        ],
        "bert-pretrain": [
            "--data",
            str(prose),
            *sets("data.vocab_size=200", "model.d_model=32", "model.d_ff=64", "model.layers=2", "train.batch_size=8"),
        ],
        "vit": [
            "--data",
            str(root / "images"),
            *sets(
                "train.batch_size=8",
                "data.image_size=16",
                "model.patch=4",
                "data.channels=3",
                "model.d_model=16",
                "model.d_ff=32",
                "model.depth=2",
            ),
        ],
        "conformer": [
            "--data",
            str(root / "audio"),
            *sets("model.layers=2", "model.d_model=32", "model.d_ff=64", "model.heads=4", "train.batch_size=4"),
        ],
    }
    inputs = {
        "translation": "fünfundzwanzig",
        "causal-lm": "def f(x):",
        "bert-pretrain": "Sentence [MASK] of story.\tIt talks about item.",
        "vit": str(root / "images" / "c0" / "0.png"),
        "conformer": str(root / "audio" / "u3.wav"),
        "forecast": str(root / "history.csv"),
    }
    folders = {}
    for recipe, text in inputs.items():
        run = trained_run if recipe == "translation" else root / recipe
        if recipe != "translation":
            cli("train", recipe, "--max-steps", "2", "--out", str(run), *tiny[recipe])
        cli("inspect-attention", str(run), text, "--out", str(root / f"{recipe}-attention"))
        folders[recipe] = root / f"{recipe}-attention"
    return folders


def data_of(folder: Path) -> dict:
    html = (folder / "report.html").read_text(encoding="utf-8")
    return json.loads(re.search(r'<script type="application/json" id="data">(.*?)</script>', html, re.S).group(1))


def decode(blob: str, shape: list[int]) -> np.ndarray:
    """What the page decodes: base64 → inflate → (q/255)²."""
    return report_page.dequantise(np.frombuffer(zlib.decompress(base64.b64decode(blob)), np.uint8)).reshape(shape)


def close_to(shown, exact) -> bool:
    """Within 8 bits of √w (and four printed decimals): the page's precision."""
    return bool(np.all(np.abs(np.asarray(shown) - exact) <= np.sqrt(exact) / 255 + 1e-4))


# -- without a browser: the file and the data each page gets ---------------------------------------
def test_page_loads_nothing_from_outside(pages):
    for folder in pages.values():
        html = (folder / "report.html").read_text(encoding="utf-8")
        policy = re.search(r'http-equiv="Content-Security-Policy" content="([^"]+)"', html).group(1)
        assert "default-src 'none'" in policy and "unsafe" not in policy
        script = re.findall(r"<script>(.*?)</script>", html, re.S)
        assert len(script) == 1 and report_page.sha256(script[0]) in policy  # only the page's own script may run
        markup = re.sub(r"<(script|style)\b[^>]*>.*?</\1>", "", html, flags=re.S)
        assert re.findall(r"""\b(?:src|href)\s*=\s*["']?([^"'\s>]+)""", markup) == ["data:,"]  # the empty favicon
        assert "url(" not in re.search(r"<style>(.*?)</style>", html, re.S).group(1)
        assert not re.search(r"https?:|//[a-z]", script[0].replace("// ", ""))  # no address in the code (comments aside)


def test_weights_round_trip_within_eight_bits_of_the_root(pages):
    folder = pages["translation"]
    weights, data = np.load(folder / "attention.npz"), data_of(folder)
    assert [m["name"] for m in data["modules"]] == list(weights.files)
    for module in data["modules"]:
        assert close_to(decode(module["weights"], module["shape"]), weights[module["name"]])
    table = data["table"]
    assert table["columns"][:5] == ["module", "head", "entropy (nats)", "most attended", "weight"]
    assert len(table["rows"]) == sum(weights[name].shape[0] for name in weights.files)
    # the uniform row's 1/512 survives (it is 0 in plain 8 bits), and 1 stays 1
    assert report_page.dequantise(report_page.quantise(np.array([1 / 512, 1.0])))[0] == pytest.approx(1 / 512, rel=0.1)
    assert report_page.dequantise(report_page.quantise(np.array([1.0])))[0] == 1.0


def test_translation_page_aligns_cross_attention(pages):
    data, tokens = data_of(pages["translation"]), json.loads((pages["translation"] / "tokens.json").read_text())
    (panel,) = data["panels"]
    assert panel["kind"] == "alignment" and panel["modules"] == ["decoder.layers.0.cross_attn", "decoder.layers.1.cross_attn"]
    target = tokens["axes"]["target"]
    assert panel["rows"] == [*target[1:], "</s>"]  # what each decoder position predicts, the end included


def test_vit_page_lays_attention_and_rollout_over_the_image(pages):
    folder = pages["vit"]
    (panel,) = data_of(folder)["panels"]
    grid = json.loads((folder / "tokens.json").read_text())["grid"]
    assert panel["kind"] == "image" and panel["overlay"] == {"query": 0, "keys": [1, 1 + grid[0] * grid[1]], "grid": grid}
    assert panel["pixels"]["shape"] == [16, 16, 3]
    rollout = panel["maps"]["rollout"]
    codes = np.frombuffer(base64.b64decode(rollout["bytes"]), np.uint8).reshape(rollout["shape"])
    shown = rollout["lo"] + codes / 255 * (rollout["hi"] - rollout["lo"])
    weights = np.load(folder / "attention.npz")
    expected = attention_rollout([weights[f"encoder.layers.{i}.self_attn"] for i in range(2)])[0, 1:].reshape(grid)
    np.testing.assert_allclose(shown, expected, atol=(rollout["hi"] - rollout["lo"]) / 255 + 1e-9)


def test_conformer_page_puts_the_spectrogram_on_the_time_axis(pages):
    folder = pages["conformer"]
    text, spectrogram = data_of(folder)["panels"]
    described = json.loads((folder / "tokens.json").read_text())
    assert text == {"kind": "text", "title": "transcript (greedy)", "lines": [described["transcript"]], "place": "above"}
    assert spectrogram["align"] == "keys" and spectrogram["pixels"]["shape"][0] == 80  # mel bins
    frames, seconds = len(described["axes"]["frames"]), described["frame_seconds"]
    features = spectrogram["pixels"]["shape"][1]
    assert spectrogram["span"] == pytest.approx(features * 0.01 / seconds) and frames <= spectrogram["span"] < frames + 2


def test_bert_page_marks_the_segment_and_fills_the_mask(pages):
    folder = pages["bert-pretrain"]
    data, described = data_of(folder), json.loads((folder / "tokens.json").read_text())
    assert data["boundaries"] == {"tokens": described["segments"].index(1)}
    (fill,) = data["panels"]
    assert fill["kind"] == "table" and fill["columns"] == ["position", "rank", "token", "probability"]
    mask = described["axes"]["tokens"].index("[MASK]")
    assert [row[:2] for row in fill["rows"]] == [[mask, rank] for rank in range(1, 6)]
    probabilities = [row[3] for row in fill["rows"]]
    assert probabilities == sorted(probabilities, reverse=True) and 0 < sum(probabilities) <= 1


def test_causal_lm_table_carries_the_head_types(pages):
    folder = pages["causal-lm"]
    table, scores = data_of(folder)["table"], json.loads((folder / "head_types.json").read_text())
    assert table["columns"][5:] == ["previous_token", "duplicate_token", "induction"]
    for name, head, *_, previous, duplicate, induction in table["rows"]:
        assert [previous, duplicate, induction] == [pytest.approx(scores[name][k][head], abs=1e-4) for k in table["columns"][5:]]


def synthetic(layers: int, heads: int, length: int, seed: int = 0) -> tuple[AttentionExample, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    scores = (
        rng.normal(size=(layers, heads, length, length)).astype(np.float32)
        * np.linspace(0.5, 4, heads, dtype=np.float32)[:, None, None]
    )
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    example = AttentionExample(
        run=lambda: None, tokens={"tokens": [f"t{i}" for i in range(length)]}, axes=lambda name: ("tokens", "tokens")
    )
    return example, {f"encoder.layers.{i}.self_attn": weights[i] for i in range(layers)}


def test_modules_past_the_cap_are_listed_but_left_out(monkeypatch, tmp_path):
    example, weights = synthetic(3, 2, 10)
    monkeypatch.setattr(report_page, "CAP", 2 * 2 * 10 * 10)
    left_out = report_page.write_report(tmp_path / "report.html", "capped", example, weights)
    assert left_out == ["encoder.layers.2.self_attn"]
    data = data_of(tmp_path)
    assert [m["weights"] is None for m in data["modules"]] == [False, False, True]
    assert all(m["thumbs"] for m in data["modules"]) and len(data["table"]["rows"]) == 6  # still in the grid and table


def test_the_command_says_which_modules_it_left_out(trained_run, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(report_page, "CAP", 1)
    cli("inspect-attention", str(trained_run), "drei", "--out", str(tmp_path))
    err = " ".join(capsys.readouterr().err.split())  # rich wraps long lines
    assert "the matrices of 6 modules (from encoder.layers.0.self_attn on) are in attention.npz only" in err
    assert all(m["weights"] is None for m in data_of(tmp_path)["modules"])


def test_markup_in_the_input_stays_text(tmp_path):
    example, weights = synthetic(1, 1, 3)
    example.tokens["tokens"][1] = "</script><script>alert(1)</script><!--"
    report_page.write_report(tmp_path / "report.html", "<b>title</b>", example, weights)
    html = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert len(re.findall(r"<script", html)) == 2 and "<b>" not in html  # the data block and the page's own
    assert data_of(tmp_path)["axes"]["tokens"][1] == "</script><script>alert(1)</script><!--"


def test_a_recipe_panel_of_an_unknown_kind_is_a_usage_error(tmp_path):
    example, weights = synthetic(1, 1, 4)
    example.page = lambda weights: {"panels": [{"kind": "video", "title": "x"}]}
    with pytest.raises(report_page.TfkitError, match="panel kind 'video' is not one of text, table, image, plot, alignment"):
        report_page.write_report(tmp_path / "report.html", "bad", example, weights)
    example.page = lambda weights: {"panels": [{"kind": "plot", "title": "series", "lines": {"load": np.zeros(4)}}]}
    with pytest.raises(report_page.TfkitError, match="the plot panel 'series' needs its lines as lists of numbers"):
        report_page.write_report(tmp_path / "report.html", "bad", example, weights)


# -- in a real browser -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def browser():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        chromium = None
    if chromium is None:
        reason = "no browser: needs playwright (pip) and Debian's chromium (apt-get install chromium)"
        if os.environ.get("TFKIT_REQUIRE_BROWSER") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium)
        yield browser
        browser.close()


class Opened:
    """A page opened from file:// with its console errors and every request it made recorded."""

    def __init__(self, browser, path: Path):
        self.errors, self.requests, self.failures, self.responses = [], [], {}, []
        self.page = browser.new_page(accept_downloads=True)
        self.page.on("console", lambda message: message.type == "error" and self.errors.append(message.text))
        self.page.on("pageerror", lambda error: self.errors.append(str(error)))
        self.page.on("request", lambda request: self.requests.append(request.url))
        self.page.on("requestfailed", lambda request: self.failures.update({request.url: request.failure}))
        self.page.on("response", lambda response: self.responses.append(response.url))
        self.url = path.resolve().as_uri()
        start = time.perf_counter()
        self.page.goto(self.url)
        self.page.wait_for_selector("body[data-loaded=yes]", timeout=60_000)
        self.seconds = time.perf_counter() - start

    def select(self, module: int, head: int) -> None:
        self.page.select_option("#module", str(module))
        self.page.select_option("#head", str(head))
        self.page.wait_for_selector(f"body[data-ready='{module} {head}']")

    def pixels(self, selector: str) -> str:
        return self.page.eval_on_selector(selector, "canvas => canvas.toDataURL()")

    def point(self, selector: str, x: float, y: float) -> None:
        """Move the mouse to canvas pixel (x, y)."""
        box = self.page.locator(selector).bounding_box()
        width = self.page.eval_on_selector(selector, "canvas => canvas.width")
        scale = box["width"] / width
        self.page.mouse.move(box["x"] + x * scale, box["y"] + y * scale)

    def download(self, selector: str) -> bytes:
        with self.page.expect_download() as info:
            self.page.click(selector)
        return Path(info.value.path()).read_bytes()


def not_blank(png: bytes) -> bool:
    return np.asarray(Image.open(io.BytesIO(png)).convert("L")).std() > 5


def keep_screenshot(page, name: str) -> None:
    """With TFKIT_SCREENSHOTS=DIR (how the README's pictures are made), the page's first screen,
    scaled to 60% and cut to 64 colours so that it stays small in the repository."""
    folder = os.environ.get("TFKIT_SCREENSHOTS")
    if folder:
        image = Image.open(io.BytesIO(page.screenshot())).convert("RGB")
        image = image.resize((image.width * 3 // 5, image.height * 3 // 5), Image.LANCZOS).quantize(64)
        image.save(Path(folder) / f"{name}.png", optimize=True)


def test_views_render_and_react(browser, pages):
    folder = pages["translation"]
    weights, data = np.load(folder / "attention.npz"), data_of(folder)
    opened = Opened(browser, folder / "report.html")
    page = opened.page
    cross = [m["name"] for m in data["modules"]].index("decoder.layers.1.cross_attn")
    before = opened.pixels("#heatmap")
    opened.select(cross, 2)
    assert opened.pixels("#heatmap") != before
    keep_screenshot(page, "translation")
    w = weights["decoder.layers.1.cross_attn"][2]
    # the value under the pointer is the npz entry
    layout = page.evaluate("heatmapLayout(state.current)")
    for i, j in [(0, 0), (w.shape[0] - 1, w.shape[1] - 1), (1, 2)]:
        opened.point("#heatmap", layout["left"] + (j + 0.5) * layout["cell"], layout["top"] + (i + 0.5) * layout["cell"])
        text = page.text_content("#readout")
        assert text.startswith(f"query {i} ") and f"→ key {j} " in text
        assert close_to(float(text.rsplit(": ", 1)[1]), w[i, j]), (text, w[i, j])
    # token view: hovering a query shows its attention alone; clicking two sums them
    row = page.evaluate("tokenLayout(state.current).row")
    opened.point("#tokens", 20, 4 + 1.5 * row)
    assert page.text_content("#tokens-note").startswith("query 1 ")
    for q in (0, 2):
        opened.point("#tokens", 20, 4 + (q + 0.5) * row)
        page.mouse.down()
        page.mouse.up()
    opened.point("#tokens", 200, 2)  # off the tokens
    summed = w[0] + w[2]
    note = page.text_content("#tokens-note")
    assert note.startswith(f"queries 0, 2 summed: most attended key {summed.argmax()} ")
    assert close_to(float(note.rsplit("(", 1)[1].rstrip(")")) / 2, summed.max() / 2)
    # the alignment panel follows the chosen cross-attention head: each row's largest weight, as Pharaoh
    pharaoh = page.text_content("[id^=pharaoh-]").split("\n")[1].split()
    assert pharaoh == [
        f"{i}-{j}" for j, i in enumerate(decode(data["modules"][cross]["weights"], data["modules"][cross]["shape"])[2].argmax(-1))
    ]
    # a thumbnail opens its head; the table sorts and opens heads too
    page.click("#grid canvas[data-module='0'][data-head='1']")
    page.wait_for_selector("body[data-ready='0 1']")
    assert page.text_content("#heads tr.current").startswith("encoder.layers.0.self_attn1")
    page.click("#heads th:has-text('entropy')")
    page.click("#heads th:has-text('entropy')")  # second click: ascending
    column = [
        float(v) for v in page.eval_on_selector_all("#heads tbody tr td:nth-child(3)", "cells => cells.map(c => c.textContent)")
    ]
    assert column == sorted(column) and len(column) == len(data["table"]["rows"])
    lowest = min(data["table"]["rows"], key=lambda r: r[2])
    page.click("#heads tbody tr:first-child")
    page.wait_for_selector(f"body[data-ready='{[m['name'] for m in data['modules']].index(lowest[0])} {lowest[1]}']")
    assert opened.errors == [] and opened.requests == [opened.url]
    page.close()


def test_export_png_and_csv(browser, pages):
    folder = pages["translation"]
    weights = np.load(folder / "attention.npz")
    opened = Opened(browser, folder / "report.html")
    opened.select(list(weights.files).index("decoder.layers.1.cross_attn"), -1)  # the mean of its heads
    rows = list(csv_rows(opened.download("#csv")))
    tokens = json.loads((folder / "tokens.json").read_text())["axes"]
    assert rows[0] == ["query \\ key", *tokens["source"]] and [r[0] for r in rows[1:]] == tokens["target"]
    mean = report_page.dequantise(report_page.quantise(weights["decoder.layers.1.cross_attn"])).mean(0)
    np.testing.assert_allclose(np.array([r[1:] for r in rows[1:]], dtype=float), mean, atol=2e-6)  # float32 sums, six decimals
    for button in ("heatmap", "tokens", "panel-0"):
        png = opened.download(f"button[data-png='{button}']")
        assert png.startswith(b"\x89PNG\r\n\x1a\n") and not_blank(png)
    assert opened.errors == []
    opened.page.close()


def csv_rows(data: bytes):
    import csv

    yield from csv.reader(io.StringIO(data.decode("utf-8")))


def test_the_policy_blocks_remote_loads(browser, pages):
    opened = Opened(browser, pages["translation"] / "report.html")
    page = opened.page
    page.evaluate(
        "window.violations = []; document.addEventListener('securitypolicyviolation', e => violations.push(e.blockedURI))"
    )
    fetched = page.evaluate("""async () => {
        const img = document.createElement("img");
        img.src = "https://example.com/pixel.png";
        document.body.append(img);
        const script = document.createElement("script");
        script.src = "https://example.com/tracker.js";
        document.body.append(script);
        try { await fetch("https://example.com/data.json"); return "fetched"; } catch (e) { return "refused"; }
    }""")
    page.wait_for_function("violations.length >= 3")
    assert fetched == "refused"
    assert sorted(page.evaluate("violations")) == [
        "https://example.com/data.json",
        "https://example.com/pixel.png",
        "https://example.com/tracker.js",
    ]
    # the browser turned the element loads down before they left (Playwright lists them, failed "csp")
    assert opened.requests[0] == opened.url and opened.responses == [opened.url]
    assert opened.failures == {url: "csp" for url in opened.requests[1:]} and len(opened.failures) == 2
    opened.page.close()


@pytest.mark.parametrize(
    "recipe, view",
    [
        ("vit", "#panel-0"),  # the image with the head's [CLS] → patches and the rollout over it
        ("conformer", "#heatmap"),  # the spectrogram is drawn into the heatmap, over the frame axis
        ("bert-pretrain", "#panels table"),  # fill-mask
        ("causal-lm", "#heads th:has-text('induction')"),
        ("forecast", "#panels th:has-text('permutation')"),  # the variable ranking, under the series and step importance
    ],
)
def test_each_modality_shows_its_own_view(browser, pages, recipe, view, tmp_path):
    opened = Opened(browser, pages[recipe] / "report.html")
    page = opened.page
    assert page.locator(view).count() == 1
    shot = page.screenshot(full_page=True)
    assert not_blank(shot)
    keep_screenshot(page, recipe)
    if recipe == "vit":
        before = opened.pixels("#panel-0")
        opened.select(1, 3)
        assert opened.pixels("#panel-0") != before  # the overlay follows the head
    if recipe == "conformer":
        band = page.evaluate("heatmapLayout(state.current).top")
        assert band > 90  # a band above the matrix holds the spectrogram...
        colours = page.evaluate("""Array.from(document.getElementById('heatmap').getContext('2d')
            .getImageData(heatmapLayout(state.current).left, 10, 40, 70).data)""")
        assert np.std(colours) > 5  # ...and it is drawn
        assert page.locator("#above p").text_content() == json.loads((pages[recipe] / "tokens.json").read_text())["transcript"]
    if recipe == "bert-pretrain":
        assert page.locator("#panels table tbody tr").count() == 5
    assert opened.errors == [] and opened.requests == [opened.url]
    opened.page.close()


def test_a_module_past_the_cap_says_where_it_is(browser, monkeypatch, tmp_path):
    example, weights = synthetic(2, 2, 6)
    monkeypatch.setattr(report_page, "CAP", 2 * 6 * 6)
    report_page.write_report(tmp_path / "report.html", "capped", example, weights)
    opened = Opened(browser, tmp_path / "report.html")
    opened.select(1, 0)
    assert "(not in the page)" in opened.page.text_content("#module option[value='1']")
    assert opened.page.locator("#grid canvas").count() == 4 and opened.errors == []
    opened.page.close()


def test_a_base_size_input_opens_in_seconds(browser, tmp_path):
    example, weights = synthetic(12, 12, 512)
    start = time.perf_counter()
    assert report_page.write_report(tmp_path / "report.html", "12 × 12 × 512", example, weights) == []
    written = time.perf_counter() - start
    size = (tmp_path / "report.html").stat().st_size
    opened = Opened(browser, tmp_path / "report.html")
    start = time.perf_counter()
    opened.select(11, 5)
    switched = time.perf_counter() - start
    print(
        f"12 × 12 × 512: {size / 1e6:.1f} MB, written in {written:.1f} s, opened in {opened.seconds:.1f} s, another module in {switched:.2f} s"
    )
    assert size < 40e6 and opened.seconds < 20 and switched < 5 and opened.errors == []
    opened.page.close()


def test_a_new_recipe_gets_its_views_from_data_alone(browser, tmp_path):
    """What a forecast-like recipe would return: the series on the key axis, importance, a ranking."""
    example, weights = synthetic(2, 2, 8)
    series = np.sin(np.arange(8) / 2)
    example.page = lambda weights: {
        "panels": [
            {"kind": "plot", "title": "series", "lines": {"load": series.tolist()}, "align": "keys"},
            {"kind": "plot", "title": "importance per step", "lines": {"load": np.abs(series).tolist(), "price": [0.1] * 8}},
            {
                "kind": "table",
                "title": "variables",
                "columns": ["variable", "importance"],
                "rows": [["load", 0.8], ["price", 0.2]],
            },
            {"kind": "text", "title": "note", "lines": ["context of 8 steps"], "place": "above"},
        ]
    }
    report_page.write_report(tmp_path / "report.html", "new recipe", example, weights)
    opened = Opened(browser, tmp_path / "report.html")
    page = opened.page
    assert page.text_content("#above") == "notecontext of 8 steps"
    assert page.evaluate("heatmapLayout(state.current).top") > 90  # the series sits over the key axis
    assert not_blank(opened.download("button[data-png='panel-1']"))
    page.click("#panels th:has-text('importance')")  # descending first
    assert page.text_content("#panels tbody tr:first-child td") == "load"
    page.click("#panels th:has-text('importance')")
    assert page.text_content("#panels tbody tr:first-child td") == "price"
    assert opened.errors == [] and opened.requests == [opened.url]
    page.close()


# -- tfkit report: what training did ------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_runs(tmp_path_factory) -> tuple[Path, Path]:
    """Two short translation runs that differ in one key, the second resumed once (its clock must go on)."""
    root = tmp_path_factory.mktemp("curves")
    base = [
        "data.train_size=200",
        "model.d_model=32",
        "model.d_ff=64",
        "train.eval_every=5",
        "train.log_every=2",
        "train.save_every=5",
    ]
    cli("train", "translation", *sets(*base, "train.steps=10"), "--out", str(root / "a"))
    cli("train", "translation", *sets(*base, "train.steps=5", "model.dropout=0.2"), "--out", str(root / "b"))
    cli("train", "--resume", str(root / "b"), "--max-steps", "10")
    return root / "a", root / "b"


def colours(png: Path) -> set[tuple[int, int, int]]:
    return {tuple(int(c) for c in pixel) for pixel in np.asarray(Image.open(png).convert("RGB")).reshape(-1, 3)}


def test_report_draws_one_curve_per_run_and_names_the_key_that_differs(two_runs, tmp_path, capsys):
    a, b = two_runs
    cli("report", str(a), str(b), "--out", str(tmp_path / "both"))
    page = (tmp_path / "both" / "report.html").read_text(encoding="utf-8")
    loss = re.search(r"<section class='card figure' id='training_loss' data-runs='([^']*)'", page)
    assert loss and loss.group(1).split("\n") == ["a", "b"]
    drawn = colours(tmp_path / "both" / "training_loss.png")
    assert (31, 119, 180) in drawn and (255, 127, 14) in drawn  # matplotlib's first two line colours: both runs
    assert "id='validation_bleu'" in page and (tmp_path / "both" / "validation_chrf.png").is_file()
    config = re.search(r"<table id='config'>(.*?)</table>", page, re.S).group(1)
    assert "model.dropout" in config and "train.steps" not in config  # b was resumed to 10 steps: the same config
    logged = [r for r in runs.read_metrics(b) if "lr" in r]
    assert [r["step"] for r in logged] == [2, 4, 5, 6, 8, 10]  # each session also logs its last step
    seconds = [r["seconds"] for r in logged]
    assert seconds == sorted(seconds)  # the resumed session's clock went on from the first's
    cli("report", str(a))
    assert (a / "report" / "report.html").is_file() and "model.dropout" in (a / "report" / "report.html").read_text(
        encoding="utf-8"
    )
    with pytest.raises(SystemExit) as exit_:
        main(["report", str(tmp_path)])
    assert exit_.value.code == 2
    assert f"{tmp_path} is not a run directory (it has no metrics.jsonl)" in capsys.readouterr().err


def test_the_training_report_opens_with_no_error_and_no_request(browser, two_runs, tmp_path):
    cli("report", *map(str, two_runs), "--out", str(tmp_path / "page"))
    page, problems = browser.new_page(), []
    page.on("console", lambda message: message.type == "error" and problems.append(message.text))
    page.on("pageerror", lambda error: problems.append(str(error)))
    page.on("request", lambda request: request.url.startswith(("file:", "data:")) or problems.append(request.url))
    page.goto((tmp_path / "page" / "report.html").resolve().as_uri())
    assert page.locator(".figure img").count() >= 5 and not problems
    assert all(page.eval_on_selector_all(".figure img", "images => images.map(i => i.naturalWidth > 0)"))
    assert not_blank(page.screenshot(full_page=True))
    keep_screenshot(page, "report")
