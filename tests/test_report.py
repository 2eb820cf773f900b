"""The HTML report: its numbers against pandas, and the page itself in a real headless browser.

The browser tests drive Debian's Chromium through chromium-driver with Selenium.
`.ci/run` installs both; locally: ``apt-get install chromium chromium-driver``. Where
they are missing the browser tests are skipped with that sentence; in CI (.ci/run) they fail instead.
The screenshot lands in ``test-artifacts/`` at the repository root.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from simpsons_ray import cli, query, report
from simpsons_ray.report import facts as facts_lib
from test_query import CHARACTERS, ERRORS, LISTED_FILE_SCHEMA, dataset, expected_screen_time  # noqa: F401  (the four-episode labels fixture)
from waiting import wait_until

ARTIFACTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "test-artifacts")


# ------------------------------------------------------------------ a multi-label labels set
def multi_label_rows() -> pd.DataFrame:
    """Two episodes at 4 frames/s where characters share frames, with a known co-appearance."""
    rng = np.random.default_rng(3)
    out = []
    for episode in ("s05e01", "s05e02"):
        n = 400
        present = rng.random((n, 3)) < np.array([0.6, 0.4, 0.2])
        names = [[CHARACTERS[j] for j in range(3) if present[i, j]] for i in range(n)]
        scores = [[float(s) for s in np.sort(rng.uniform(0.5, 1.0, len(c)))[::-1]] for c in names]
        out.append(pd.DataFrame({
            "episode": episode,
            "frame": np.arange(n, dtype=np.int64) * 6,
            "timestamp_s": np.arange(n) * 0.25,
            "source": [f"/nowhere/{episode}/{i:06d}.jpg" for i in range(n)],
            "label": [c[0] if c else None for c in names],
            "confidence": np.array([s[0] if s else 0.3 for s in scores], dtype=np.float32),
            "top_labels": [c[:1] or [CHARACTERS[0]] for c in names],
            "top_scores": [s[:1] or [0.3] for s in scores],
            "model_id": "resnet50-multi",
            "characters": names,
            "character_scores": scores,
        }))
    return pd.concat(out, ignore_index=True)


@pytest.fixture(scope="module")
def multi_labels(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("multi") / "labels")
    rows = multi_label_rows()
    file_schema = LISTED_FILE_SCHEMA
    for episode, group in rows.groupby("episode"):
        os.makedirs(os.path.join(root, f"episode={episode}"))
        table = pa.Table.from_pandas(group.drop(columns="episode"), schema=file_schema, preserve_index=False)
        pq.write_table(table, os.path.join(root, f"episode={episode}", "part-0.parquet"))
    return root, rows


def expected_together(rows: pd.DataFrame) -> pd.DataFrame:
    """Independent pandas: each pair of characters in a frame's list, seconds = frames x 0.25."""
    exploded = rows[["episode", "frame", "characters"]].explode("characters").dropna()
    pairs = exploded.merge(exploded, on=["episode", "frame"])
    pairs = pairs[pairs["characters_x"] < pairs["characters_y"]]
    counted = pairs.groupby(["characters_x", "characters_y"]).size().rename("frames").reset_index()
    counted["seconds"] = counted["frames"] * 0.25
    return counted.rename(columns={"characters_x": "a", "characters_y": "b"})


# ------------------------------------------------------------------ numbers, without a browser
def test_report_numbers_match_pandas(dataset, tmp_path):  # noqa: F811
    labels, rows = dataset
    config = report.ReportConfig(labels_uri=labels, output_uri=str(tmp_path / "r.html"))
    _, facts = facts_lib.collect(config)
    screen = facts_lib.screen_table(facts)
    expected = expected_screen_time(rows, 0.0)
    merged = screen.merge(expected, on=["episode", "character"], suffixes=("", "_pandas"))
    assert len(merged) == len(expected) == len(screen)
    assert (merged["frames"] == merged["frames_pandas"]).all()
    np.testing.assert_allclose(merged["seconds"], merged["seconds_pandas"])
    quality = facts_lib.quality_table(facts).set_index("episode")
    assert quality["frames"].to_dict() == {**rows.groupby("episode").size().to_dict(), "s03e09": 0}
    assert quality["error_rows"].to_dict() == {e: ERRORS.get(e, 0) for e in quality.index}
    low = rows.groupby("episode")["confidence"].apply(lambda c: float((c < 0.5).mean()))
    np.testing.assert_allclose(quality.loc[low.index, "low_confidence_share"], low)
    # The per-character frames of the timeline are the segments `query segments` gives.
    segments = query.segments(labels)
    assert sum(len(f.segments) for f in facts) == len(segments)


def test_co_appearance_matches_pandas(multi_labels, tmp_path):
    labels, rows = multi_labels
    _, facts = facts_lib.collect(report.ReportConfig(labels_uri=labels, output_uri=str(tmp_path / "r.html")))
    together = facts_lib.together_table(facts).drop(columns="episodes")
    expected = expected_together(rows)
    merged = together.merge(expected, on=["a", "b"], suffixes=("", "_pandas"))
    assert len(merged) == len(expected) == len(together) == 3
    assert (merged["frames"] == merged["frames_pandas"]).all()
    np.testing.assert_allclose(merged["seconds"], merged["seconds_pandas"])
    # Screen time counts a shared frame for everyone on it.
    screen = facts_lib.screen_table(facts).groupby("character")["frames"].sum()
    assert screen.to_dict() == rows["characters"].explode().dropna().value_counts().to_dict()


def test_report_narrows_to_episodes_and_characters(dataset, tmp_path, capsys):  # noqa: F811
    labels, _ = dataset
    out = tmp_path / "narrow.html"
    assert cli.main(["report", "--labels", labels, "--output", str(out), "--episodes", "s01e01,s02e01",
                     "--characters", "homer_simpson", "--thumbnails", "2"]) == 0
    printed = capsys.readouterr().out
    assert "report of 2 episode(s)" in printed and "built in" in printed
    page = out.read_text()
    assert "data-episode='s01e01'" in page and "data-episode='s01e02'" not in page
    assert "character-homer_simpson" in page and "character-ned_flanders" not in page
    assert cli.main(["report", "--labels", labels, "--output", str(out), "--characters", "homer_simpsn"]) == 2
    assert "closest known names: homer_simpson" in capsys.readouterr().err
    assert cli.main(["report", "--labels", labels, "--output", str(out), "--model", str(tmp_path)]) == 2
    assert "is not a model artifact" in capsys.readouterr().err


def test_report_from_s3_to_s3_says_what_local_does(dataset, s3_server, s3_bucket, tmp_path):  # noqa: F811
    from imagegen import upload_tree

    labels, _ = dataset
    s3_labels = upload_tree(s3_server.client(), s3_bucket, labels, "report/labels")
    local = report.build_report(report.ReportConfig(labels_uri=labels, output_uri=str(tmp_path / "local.html"), thumbnails=0))
    remote = report.build_report(report.ReportConfig(labels_uri=s3_labels, output_uri=f"s3://{s3_bucket}/report/r.html", thumbnails=0))
    assert remote.episodes == local.episodes == 5
    page = s3_server.client().get_object(Bucket=s3_bucket, Key="report/r.html")["Body"].read().decode()
    section = lambda text: text[text.index("<h2 id='totals'>"):text.index("<h2 id='timelines'>")]  # noqa: E731
    assert section(page) == section((tmp_path / "local.html").read_text())


# ------------------------------------------------------------------ the page in Chromium
@pytest.fixture(scope="module")
def browser():
    # Looked up when the first browser test runs, not at collection: .ci/run installs the
    # browser beside the first tests, and says so in CI_BROWSER_INSTALL_DONE. There the
    # tests wait for the install and fail without a browser; elsewhere they skip, saying why.
    done = os.environ.get("CI_BROWSER_INSTALL_DONE")
    if done:
        wait_until(lambda: os.path.exists(done), timeout=600, every=2)
    chromium, chromedriver = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")
    if not (chromium and chromedriver):
        if done:
            pytest.fail("CI installs Chromium and chromium-driver in .ci/run, and they are missing: see /tmp/ci-apt.log")
        pytest.skip("needs Chromium and chromium-driver: apt-get install chromium chromium-driver (.ci/run installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,2200"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(chromedriver), options=options)
    yield driver
    driver.quit()


def _model_artifact(root: str) -> str:
    """A model folder as `train` leaves it, its files written here: config, metrics, a picture."""
    from PIL import Image

    os.makedirs(root)
    with open(os.path.join(root, "config.json"), "w") as f:
        json.dump({"arch": "resnet18"}, f)
    result = {"accuracy": 0.8512, "macro_f1": 0.8437, "num_images": 843,
              "calibration": {"ece_before": 0.084, "ece_after": 0.034, "temperature": 0.815}}
    with open(os.path.join(root, "metrics.json"), "w") as f:
        json.dump({"model_id": "resnet18-abcd", "best_epoch": 9, "epochs_run": 10, "test": result,
                   "validation": {**result, "accuracy": 0.8470}}, f)
    Image.new("RGB", (40, 30), (200, 30, 30)).save(os.path.join(root, "confusion_matrix.png"))
    return root


def _errors(driver) -> list[dict]:
    return [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


@pytest.mark.browser
def test_report_in_a_browser(dataset, browser, tmp_path):  # noqa: F811
    from selenium.webdriver.common.by import By

    labels, rows = dataset
    out = tmp_path / "report.html"
    model = _model_artifact(str(tmp_path / "model"))
    assert cli.main(["report", "--labels", labels, "--output", str(out), "--model", model]) == 0
    page = out.read_text()
    assert "src=\"http" not in page and "src='http" not in page and "<link" not in page  # self-contained
    browser.get(out.as_uri())
    assert _errors(browser) == []
    sections = {e.get_attribute("id") for e in browser.find_elements(By.CSS_SELECTOR, "h2[id]")}
    assert sections == {"summary", "totals", "seasons", "episodes", "together", "timelines", "characters", "quality", "model"}
    cards = {c.get_attribute("data-name"): c.find_element(By.TAG_NAME, "b").text for c in browser.find_elements(By.CSS_SELECTOR, ".card")}
    assert cards["episodes"] == "5"  # four labelled, one whose every frame failed
    assert cards["frames"] == f"{len(rows):,}"
    assert cards["error rows"] == str(sum(ERRORS.values()))

    # Series totals: frames per character, and sorting by a column.
    table = browser.find_element(By.ID, "series-totals")
    frames = {r.find_elements(By.TAG_NAME, "td")[0].text: int(r.find_elements(By.TAG_NAME, "td")[1].get_attribute("data-v"))
              for r in table.find_elements(By.CSS_SELECTOR, "tbody tr")}
    assert frames == rows[rows["label"].notna()].groupby("label").size().to_dict()
    header = table.find_elements(By.TAG_NAME, "th")[1]
    header.click()  # ascending
    shown = [int(td.get_attribute("data-v")) for td in table.find_elements(By.CSS_SELECTOR, "tbody tr td:nth-child(2)")]
    assert shown == sorted(shown)
    header.click()  # descending
    shown = [int(td.get_attribute("data-v")) for td in table.find_elements(By.CSS_SELECTOR, "tbody tr td:nth-child(2)")]
    assert shown == sorted(shown, reverse=True)

    # Every episode has a timeline; drawn on opening, a bar per segment.
    browser.find_element(By.ID, "open-all").click()
    segments = query.segments(labels)
    for details in browser.find_elements(By.CSS_SELECTOR, "details.timeline"):
        episode = details.get_attribute("data-episode")
        bars = details.find_elements(By.CSS_SELECTOR, "svg rect")
        assert len(bars) == (segments["episode"] == episode).sum(), episode

    # Contact sheets: the frames are real pictures the page shows.
    images = browser.find_elements(By.CSS_SELECTOR, ".sheet img")
    assert len(images) == sum(min(8, n) for n in frames.values())
    assert all(browser.execute_script("return arguments[0].naturalWidth", img) > 0 for img in images)
    # The model's card: test and validation apart.
    card = browser.find_element(By.ID, "model-scores").text
    assert "test (reported only)" in card and "0.851" in card and "0.847" in card
    assert _errors(browser) == []
    os.makedirs(ARTIFACTS, exist_ok=True)
    browser.save_screenshot(os.path.join(ARTIFACTS, "report.png"))


@pytest.mark.browser
def test_report_with_characters_in_a_browser(multi_labels, browser, tmp_path):
    from selenium.webdriver.common.by import By

    labels, rows = multi_labels
    out = tmp_path / "multi.html"
    assert cli.main(["report", "--labels", labels, "--output", str(out)]) == 0
    browser.get(out.as_uri())
    assert _errors(browser) == []
    together = browser.find_element(By.ID, "together-table")
    shown = {(tr.find_elements(By.TAG_NAME, "td")[0].text, tr.find_elements(By.TAG_NAME, "td")[1].text):
             float(tr.find_elements(By.TAG_NAME, "td")[3].get_attribute("data-v")) for tr in together.find_elements(By.CSS_SELECTOR, "tbody tr")}
    expected = expected_together(rows)
    assert shown == {(a, b): s for a, b, s in zip(expected["a"], expected["b"], expected["seconds"])}
    # Sources that don't exist are grey tiles, not a broken page.
    assert browser.find_elements(By.CSS_SELECTOR, ".sheet .missing")
    assert len(browser.find_elements(By.CSS_SELECTOR, ".heatmap rect")) == 2 * len(expected)  # the grid is symmetric
    os.makedirs(ARTIFACTS, exist_ok=True)
    browser.save_screenshot(os.path.join(ARTIFACTS, "report-characters.png"))


HOSTILE = ["<img src=x onerror=\"document.title='pwned'\">", "<!--<script>document.title='pwned'</script>", "</script><b>bold</b>",
           "a&amp;b \"quoted\" 'single'"]


@pytest.mark.browser
def test_hostile_names_and_model_id_stay_inert_text_in_a_browser(browser, tmp_path):
    """Character names and a model id made of HTML and script: shown as text, nothing runs, nothing is added."""
    from selenium.webdriver.common.by import By

    rows = multi_label_rows()
    swap = dict(zip(CHARACTERS[:3], HOSTILE[:3]))
    rows["characters"] = [[swap[c] for c in names] for names in rows["characters"]]
    rows["label"] = [swap.get(c, c) if c else None for c in rows["label"]]
    rows["top_labels"] = [[swap.get(c, c) for c in names] for names in rows["top_labels"]]
    rows["model_id"] = HOSTILE[3] + HOSTILE[0]
    rows["episode"] = rows["episode"].map({"s05e01": "s05e01 (x) [y]", "s05e02": "s05e02+1"})  # ids hold no markup (labels.ids)
    root = tmp_path / "labels"
    for episode, group in rows.groupby("episode"):
        os.makedirs(root / f"episode={episode}")
        table = pa.Table.from_pandas(group.drop(columns="episode"), schema=LISTED_FILE_SCHEMA, preserve_index=False)
        pq.write_table(table, root / f"episode={episode}" / "part-0.parquet")
    out = tmp_path / "hostile.html"
    assert cli.main(["report", "--labels", str(root), "--output", str(out), "--thumbnails", "0"]) == 0
    browser.get(out.as_uri())
    for details in browser.find_elements(By.CSS_SELECTOR, "details.timeline"):
        browser.execute_script("arguments[0].open = true", details)
    assert "pwned" not in browser.title
    assert browser.find_elements(By.CSS_SELECTOR, "img[src='x']") == []
    assert not [b for b in browser.find_elements(By.TAG_NAME, "b") if b.text == "bold"]  # the name's <b> stayed text
    text = browser.find_element(By.TAG_NAME, "body").text
    for name in HOSTILE[:3]:
        assert name in text, name  # shown, as the text it is
    assert "s05e01 (x) [y]" in text
    assert [e for e in _errors(browser) if "pwned" in e["message"] or "Uncaught" in e["message"]] == []
