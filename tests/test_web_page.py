"""The web page in a real browser: Debian's chromium driven by Playwright against a real server.

Skipped, with the reason, where chromium or Playwright is missing (`make browser` installs chromium with
apt where that is allowed). Screenshots go to test-output/.
"""

import base64
import io
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import unnoise
from unnoise.server.app import create_app

from .test_server import Server, free_port

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
OUTPUT = Path(__file__).resolve().parent.parent / "test-output"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

playwright_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no chromium on this machine (make browser installs it)"
)


@pytest.fixture(scope="module")
def server():
    port = free_port()
    running = Server(create_app(unnoise.load("shapes-32"), port=port), port)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def page(server):
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 1100, "height": 800})
        page.goto(server.url + "/")
        yield page
        browser.close()


def test_typing_a_prompt_and_pressing_generate_shows_the_images(page):
    page.fill("#prompt", "a red circle above a blue square")
    page.fill("#count", "2")
    page.fill("#steps", "12")
    page.click("#generate")
    page.wait_for_selector("#gallery figure img", timeout=60_000)
    page.wait_for_function("document.querySelectorAll('#gallery figure').length === 2", timeout=60_000)
    assert page.inner_text("#status").startswith("done: 2 image(s)")
    caption = page.inner_text("#gallery figcaption")
    assert caption.startswith("a red circle above a blue square") and "Steps: 12" in caption
    assert page.get_attribute("#preview", "src").startswith("data:image/png;base64,")
    OUTPUT.mkdir(exist_ok=True)
    page.screenshot(path=str(OUTPUT / "web-page-generate.png"), full_page=True)


def with_an_image(page) -> None:
    """The gallery holds an image: one made here if none is there yet (so a test can run on its own)."""
    ready(page)
    if page.locator("#gallery figure").count() == 0:
        page.fill("#prompt", "a red circle")
        page.fill("#count", "1")
        page.fill("#steps", "3")
        page.click("#generate")
        page.wait_for_selector("#gallery figure img", timeout=60_000)


def test_the_download_is_the_png_with_its_parameters(page):
    with_an_image(page)
    caption = page.locator("#gallery figcaption").first.inner_text()
    with page.expect_download() as download:
        page.click("#gallery figure a")
    data = Path(download.value.path()).read_bytes()
    image = Image.open(io.BytesIO(data))
    assert image.size == (32, 32) and image.info["parameters"] == caption  # the settings shown are in the PNG


def paint_a_mask(page, image: Path, *, start: float, end: float, steps: int) -> None:
    """Inpaint mode, `image` (32x32) chosen, a mouse drag on the mask from (start, start) to (end, end) px."""
    page.check("input[name=mode][value=inpaint]")
    page.set_input_files("#file", str(image))
    page.wait_for_function("document.getElementById('mask').width === 32")
    box = page.locator("#mask").bounding_box()
    page.mouse.move(box["x"] + start, box["y"] + start)
    page.mouse.down()
    page.mouse.move(box["x"] + end, box["y"] + end, steps=steps)
    page.mouse.up()


def test_inpainting_a_painted_mask_keeps_the_rest_of_the_picture(page, tmp_path):
    rng = np.random.default_rng(0)
    source = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    source.save(tmp_path / "in.png")
    paint_a_mask(page, tmp_path / "in.png", start=40, end=90, steps=5)
    page.fill("#prompt", "a green triangle")
    page.fill("#count", "1")
    before = page.locator("#gallery figure").count()
    page.click("#generate")
    page.wait_for_function(
        f"document.querySelectorAll('#gallery figure').length === {before + 1}", timeout=60_000
    )
    src = page.get_attribute("#gallery figure img", "src")
    import base64

    result = np.asarray(Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).convert("RGB"))
    changed = (result != np.asarray(source)).any(-1)
    assert 0 < changed.sum() < 32 * 32 / 2  # only the painted corner changed
    assert not changed[20:, :].any() and not changed[:, 20:].any()
    page.screenshot(path=str(OUTPUT / "web-page-inpaint.png"), full_page=True)


def test_the_api_page_lists_the_endpoints_offline(page, server):
    page.goto(server.url + "/docs")
    page.wait_for_selector("h2", timeout=30_000)
    headings = page.locator("h2").all_inner_texts()
    assert "POST /sdapi/v1/txt2img" in headings and "POST /v1/images/generations" in headings
    assert "cfg_scale" in page.inner_text("#api")
    page.screenshot(path=str(OUTPUT / "web-page-docs.png"), full_page=True)


# --- issue 13: what users of AUTOMATIC1111's and ComfyUI's pages expect --------------------------------


def ready(page) -> None:
    """The page has fetched its settings (so nothing typed is overwritten by the defaults)."""
    page.wait_for_function("document.querySelectorAll('#sampler option').length > 0", timeout=30_000)


def test_a_batch_shows_in_seed_order_and_survives_a_reload(page, server):
    page.goto(server.url + "/")
    ready(page)
    page.uncheck("#random")
    page.fill("#seed", "40")
    page.fill("#guidance", "3.25")  # any guidance value: the field has no step
    assert page.evaluate("document.getElementById('guidance').checkValidity()")
    page.fill("#prompt", "two green circles")
    page.fill("#count", "3")
    page.fill("#steps", "6")
    page.click("#generate")
    page.wait_for_function("document.getElementById('status').textContent.startsWith('done')", timeout=60_000)
    seeds = [
        c.split("Seed: ")[1].split(",")[0]
        for c in page.locator(".batch").first.locator("figcaption").all_inner_texts()
    ]
    assert seeds == ["40", "41", "42"]
    assert "CFG scale: 3.25" in page.locator(".batch").first.locator("figcaption").first.inner_text()
    before = page.locator("#gallery figure").count()
    page.reload()
    ready(page)
    page.wait_for_function(
        f"document.querySelectorAll('#gallery figure').length === {before}", timeout=30_000
    )
    assert "Seed: 40" in page.locator(".batch").first.locator("figcaption").first.inner_text()


def test_reuse_seed_and_send_to_img2img(page, server):
    page.goto(server.url + "/")
    with_an_image(page)
    caption = page.locator("#gallery figcaption").first.inner_text()
    page.check("#random")
    page.locator("#gallery figure").first.get_by_text("reuse seed").click()
    assert page.input_value("#seed") == caption.split("Seed: ")[1].split(",")[0]
    assert not page.is_checked("#random")
    page.locator("#gallery figure").first.get_by_text("img2img").click()
    assert page.is_checked("input[name=mode][value=img2img]")
    page.wait_for_function("document.getElementById('picture').width === 32")
    page.evaluate("document.getElementById('picture').width = 1")  # so the next wait sees a fresh drawing
    page.locator("#gallery figure").first.get_by_role("button", name="inpaint").click()
    assert page.is_checked("input[name=mode][value=inpaint]")
    page.wait_for_function("document.getElementById('picture').width === 32")
    assert page.is_visible("#paint")  # the mask can be painted over the sent image


def test_width_and_height_make_that_size_or_say_what_they_made(page, server):
    """Issue 13: the page asks for a size; the server makes it where the model can, or says what it made."""
    page.goto(server.url + "/")
    ready(page)
    assert (page.input_value("#width"), page.input_value("#height")) == ("32", "32")
    from unnoise.server.requests import REQUEST_MAX_IMAGES, REQUEST_MAX_STEPS

    bounds = (page.get_attribute("#steps", "max"), page.get_attribute("#count", "max"))
    assert bounds == (str(REQUEST_MAX_STEPS), str(REQUEST_MAX_IMAGES))  # the server's, written once
    page.fill("#prompt", "a red circle")
    page.fill("#count", "1")
    page.fill("#steps", "3")
    page.fill("#width", "48")
    page.fill("#height", "32")
    page.click("#generate")
    page.wait_for_function("document.getElementById('status').textContent.startsWith('done')", timeout=60_000)
    first = page.locator("#gallery figure img").first
    first.evaluate("(img) => img.decode()")
    assert first.evaluate("(img) => [img.naturalWidth, img.naturalHeight]") == [48, 32]
    box = first.bounding_box()  # shown at its true aspect ratio, not squashed into a square
    assert abs(box["width"] / box["height"] - 1.5) < 0.05, box
    page.fill("#width", "512")
    page.fill("#height", "512")
    page.click("#generate")
    page.wait_for_function(
        "document.getElementById('status').textContent.includes('asked for 512x512; made 64x64')",
        timeout=60_000,
    )


def drop_png(page, png: bytes) -> None:
    """Drop a PNG file on the page, as a user dragging it from their desktop would."""
    page.evaluate(
        """(data) => {
            const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], "dropped.png", { type: "image/png" }));
            document.body.dispatchEvent(new DragEvent("drop", { dataTransfer: transfer, bubbles: true }));
        }""",
        base64.b64encode(png).decode(),
    )


def test_dropping_a_png_restores_its_settings(page, server):
    made = unnoise.load("shapes-32").generate(
        "a small red circle in the top left", seed=77, steps=7, guidance=2.5, bind_attributes=True
    )[0]
    from unnoise.images import png_bytes

    page.goto(server.url + "/")
    ready(page)
    drop_png(page, png_bytes(made))
    page.wait_for_function("document.getElementById('status').textContent.startsWith('settings restored')")
    assert page.input_value("#prompt") == "a small red circle in the top left"
    assert (page.input_value("#seed"), page.input_value("#steps"), page.input_value("#guidance")) == (
        "77",
        "7",
        "2.5",
    )
    assert page.is_checked("#bind")


def test_dropping_an_automatic1111_png_restores_its_settings(page, server):
    """Issue 13: a PNG made by AUTOMATIC1111 (its sampler label, schedule type and model) restores too."""
    from PIL import PngImagePlugin

    text = (
        "a blue square\nNegative prompt: red\nSteps: 9, Sampler: DPM++ 2M, Schedule type: Karras,"
        " CFG scale: 6.5, Seed: 4242, Size: 64x32, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly,"
        " Version: v1.9.3"
    )
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", text)
    buffer = io.BytesIO()
    Image.new("RGB", (64, 32), "gray").save(buffer, format="PNG", pnginfo=info)
    page.goto(server.url + "/")
    ready(page)
    drop_png(page, buffer.getvalue())
    page.wait_for_function("document.getElementById('status').textContent.startsWith('settings restored')")
    restored = [
        page.input_value(f"#{k}") for k in ("prompt", "negative", "sampler", "steps", "guidance", "seed")
    ]
    assert restored == ["a blue square", "red", "dpmpp_2m", "9", "6.5", "4242"]
    assert (page.input_value("#width"), page.input_value("#height")) == ("64", "32")


def test_the_page_fits_a_phone(page, server):
    phone = page.context.browser.new_page(
        viewport={"width": 390, "height": 844}, device_scale_factor=2, is_mobile=True
    )
    try:
        phone.goto(server.url + "/")
        phone.wait_for_function("document.querySelectorAll('#sampler option').length > 0")
        width = phone.evaluate("document.documentElement.scrollWidth")
        assert width <= 390, f"the page is {width} px wide on a 390 px phone"
        box = phone.locator("#preview").bounding_box()
        assert box["x"] >= 0 and box["x"] + box["width"] <= 390
        OUTPUT.mkdir(exist_ok=True)
        phone.screenshot(path=str(OUTPUT / "web-page-phone.png"), full_page=True)
    finally:
        phone.close()


# --- issue 31 item 11: what a new user tripped on ------------------------------------------------------


def test_a_finger_drag_on_the_mask_paints_a_stroke_and_does_not_scroll_the_page(page, server, tmp_path):
    """Real touch events (Chromium's own, through the DevTools protocol) on a phone-sized page."""
    Image.new("RGB", (32, 32), "gray").save(tmp_path / "in.png")
    phone = page.context.browser.new_page(
        viewport={"width": 390, "height": 844}, device_scale_factor=2, is_mobile=True, has_touch=True
    )
    try:
        phone.goto(server.url + "/")
        ready(phone)
        phone.check("input[name=mode][value=inpaint]")
        phone.set_input_files("#file", str(tmp_path / "in.png"))
        phone.wait_for_function("document.getElementById('mask').width === 32")
        phone.locator("#mask").scroll_into_view_if_needed()
        box = phone.locator("#mask").bounding_box()
        scrolled = phone.evaluate("window.scrollY")
        cdp = phone.context.new_cdp_session(phone)
        points = [(box["x"] + 30 + 15 * i, box["y"] + 30 + 15 * i) for i in range(12)]
        for kind, (x, y) in [("touchStart", points[0]), *(("touchMove", p) for p in points[1:])]:
            cdp.send("Input.dispatchTouchEvent", {"type": kind, "touchPoints": [{"x": x, "y": y}]})
        cdp.send("Input.dispatchTouchEvent", {"type": "touchEnd", "touchPoints": []})
        painted = phone.evaluate(
            """() => { const c = document.getElementById('mask');
                const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                const rows = new Set();
                for (let i = 0; i < d.length; i += 4) if (d[i] > 128) rows.add(Math.floor(i / 4 / c.width));
                return rows.size; }"""
        )
        assert painted >= 16, f"the stroke covers {painted} rows of 32: a dot, not a drag"
        assert phone.evaluate("window.scrollY") == scrolled
    finally:
        phone.close()


def test_an_empty_guidance_field_means_the_model_s_own_guidance(page, server):
    page.goto(server.url + "/")
    ready(page)
    page.fill("#prompt", "a red circle")
    page.fill("#count", "1")
    page.fill("#steps", "2")
    page.fill("#guidance", "")
    page.click("#generate")
    page.wait_for_function("document.getElementById('status').textContent.startsWith('done')", timeout=60_000)
    caption = page.locator(".batch").first.locator("figcaption").first.inner_text()
    assert f"CFG scale: {unnoise.load('shapes-32').default_guidance:g}" in caption, caption


def test_a_png_dropped_on_an_edit_s_image_is_that_image_not_its_settings(page, server):
    made = unnoise.load("shapes-32").generate("a small red circle", seed=5, steps=3)[0]
    from unnoise.images import png_bytes

    page.goto(server.url + "/")
    ready(page)
    page.check("input[name=mode][value=img2img]")
    page.fill("#prompt", "my own prompt")
    page.evaluate(
        """(data) => {
            const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], "dropped.png", { type: "image/png" }));
            const drop = new DragEvent("drop", { dataTransfer: transfer, bubbles: true });
            document.getElementById('edit').dispatchEvent(drop);
        }""",
        base64.b64encode(png_bytes(made)).decode(),
    )
    page.wait_for_function("document.getElementById('picture').width === 32")
    assert page.input_value("#prompt") == "my own prompt"
    assert page.is_visible("#picture")  # the input's thumbnail


def test_the_sampler_menu_the_size_fields_the_empty_preview_and_the_favicon(page, server):
    missing = []
    page.on("response", lambda r: missing.append(r.url) if r.status == 404 else None)
    page.goto(server.url + "/")
    ready(page)
    labels = page.eval_on_selector_all(
        "#sampler option", "(os) => Object.fromEntries(os.map((o) => [o.value, o.text]))"
    )
    assert labels["dpmpp_2m"] == "DPM++ 2M" and labels["euler_ancestral"] == "Euler a"
    page.evaluate("localStorage.clear(); document.getElementById('preview').removeAttribute('src')")
    assert not page.is_visible("#preview")  # no broken-image icon before there is an image
    assert page.is_visible("#size")
    for mode in ("img2img", "inpaint"):
        page.check(f"input[name=mode][value={mode}]")
        assert not page.is_visible("#size")  # an edit keeps its image's size
    page.check("input[name=mode][value=txt2img]")
    assert missing == [], missing


def test_inpainting_progress_says_why_it_counts_more_steps_than_asked(page, server, tmp_path):
    Image.new("RGB", (32, 32), "gray").save(tmp_path / "in.png")
    page.goto(server.url + "/")
    ready(page)
    paint_a_mask(page, tmp_path / "in.png", start=20, end=60, steps=4)
    page.fill("#prompt", "a blue square")
    page.fill("#count", "1")
    page.fill("#steps", "4")
    page.evaluate(
        """() => { window.seen = []; new MutationObserver(() => window.seen.push(
            document.getElementById('status').textContent)).observe(document.getElementById('status'),
            { childList: true, characterData: true, subtree: true }); }"""
    )
    page.click("#generate")
    page.wait_for_function("document.getElementById('status').textContent.startsWith('done')", timeout=60_000)
    progress = [s for s in page.evaluate("window.seen") if ": step " in s]
    assert progress and all("RePaint" in s for s in progress if int(s.split(" of ")[1].split()[0]) > 4), (
        progress
    )
    assert any("RePaint" in s for s in progress), progress
