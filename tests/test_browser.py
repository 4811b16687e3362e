"""The feature browser in a real headless Chromium (Debian's chromium + chromium-driver, driven by selenium): no
console errors, search, sorting, escaping, pagination, a screenshot. Skips when the browser or selenium is absent."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from evaluation.interpret.browser import render_feature_browser, validate_features, write_feature_browser

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
TAGS = ["NOUN", "VERB", "ADJ", "ADV", "DET"]
WORDS = ["bank", "river", "</script><b>bold</b>", "a&b", '"quoted"']  # feature i activates on WORDS[i % 5]


def synthetic_features(n: int, n_contexts: int = 4) -> list[dict]:
    out = []
    for i in range(n):
        word, tag = WORDS[i % 5], TAGS[i // 10 % 5]
        second = "VERB" if tag == "NOUN" else "NOUN"
        out.append({
            "id": i, "label": f"{tag} feature", "purity": ((i * 37) % n) / n,
            "energy": 0.001 * (i + 1), "fires": 10 * i, "pos_dist": {tag: 0.7, second: 0.2, ".": 0.1},
            "hist": {"edges": [0.1 * k for k in range(11)], "counts": [(k * 7 + i) % 13 for k in range(10)]},
            "contexts": [{"tokens": ["[CLS]", "the", word, "##s", "by", "the", "water", "[SEP]"], "index": 2,
                          "value": 3.0 - 0.5 * c} for c in range(n_contexts)],
            "contribution": None if i % 4 == 0 else 0.01 * i, "survival": 0.5, "stability_cos": float("nan"),
        })
    return out


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium: pip install selenium")
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not Path(path).is_file():
            pytest.skip(f"needs {path}: apt-get install {package} (Debian)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1400,900", f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    drv = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    drv.set_page_load_timeout(30)
    yield drv
    drv.quit()


def rows(driver) -> list:
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, "#rows > tr")


def row_ids(driver) -> list[int]:
    return [int(r.get_attribute("data-id")) for r in rows(driver)]


def wait_for(predicate, timeout: float = 5.0) -> None:
    """Poll ``predicate`` (rows are rebuilt after a debounce, so elements may go stale in between)."""
    from selenium.common.exceptions import StaleElementReferenceException

    end = time.monotonic() + timeout
    while True:
        try:
            if predicate():
                return
        except StaleElementReferenceException:
            pass
        if time.monotonic() > end:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)


def type_query(driver, query: str) -> None:
    """Replace the search box's text by typing, as a person would (every key fires an input event)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    box = driver.find_element(By.ID, "search")
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(Keys.BACKSPACE)
    box.send_keys(query)


def severe(driver) -> list[dict]:
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def test_page_is_self_contained_and_escapes_data(tmp_path):
    page = render_feature_browser(synthetic_features(5), title="<T> & co", summary={"layer": 3})
    assert "<script src" not in page and "http://" not in page.replace("http://www.w3.org/2000/svg", "")
    assert "https://" not in page and "<link" not in page
    assert page.count("</script>") == 2 and "<title>&lt;T&gt; &amp; co</title>" in page
    data = page.split('id="feature-data">')[1].split("</script>")[0]
    assert json.loads(data)["features"][2]["contexts"][0]["tokens"][2] == WORDS[2]
    assert validate_features(synthetic_features(1))[0]["stability_cos"] is None  # NaN -> null (JSON has no NaN)
    bad = synthetic_features(1)
    del bad[0]["purity"]
    with pytest.raises(ValueError, match=r"feature #0 \(id 0\): missing key\(s\) \['purity'\]"):
        validate_features(bad)
    whole_text = synthetic_features(1)
    whole_text[0]["contexts"][0] = {"tokens": ["a whole sentence, no token known"], "index": -1, "value": 1.0}
    assert validate_features(whole_text)[0]["contexts"][0]["index"] == -1  # allowed: nothing highlighted
    bad = synthetic_features(1)
    bad[0]["contexts"][0]["index"] = 8
    with pytest.raises(ValueError, match="context 0 index 8 is outside its 8 tokens"):
        validate_features(bad)


def test_browser_search_sort_and_screenshot(driver, tmp_path):
    from selenium.webdriver.common.by import By

    features = synthetic_features(50)
    features[1]["contexts"][0] = {"tokens": ["a whole sentence, no token known"], "index": -1, "value": 1.0}
    density = {"edges": list(range(-10, 1)), "counts": [3, 0, 0, 0, 0, 1, 4, 20, 15, 7]}
    path = write_feature_browser(features, tmp_path / "features.html", title="Layer 3 SAE <test>",
                                 summary={"model": "tiny", "features": 50, "fvu": 0.123456, "l0": 32}, density=density)
    driver.get(path.as_uri())
    assert driver.title == "Layer 3 SAE <test>"
    assert len(rows(driver)) == 50
    assert severe(driver) == []
    assert "fvu" in driver.find_element(By.ID, "summary").text
    # the feature density beside the summary: one bar per decade, the tallest full height
    bars = driver.find_elements(By.CSS_SELECTOR, "#summary svg#density rect")
    assert len(bars) == 10 and max(float(b.get_attribute("height")) for b in bars) == 40
    assert [b.get_attribute("height") for b in bars][1:5] == ["0"] * 4
    # escaping: the token is shown as text, no element was created from it
    marks = driver.find_elements(By.CSS_SELECTOR, "#rows tr[data-id='2'] mark")
    assert marks[0].text == "</script><b>bold</b>"
    assert driver.find_elements(By.CSS_SELECTOR, "#rows b") == []
    whole = driver.find_element(By.CSS_SELECTOR, "#rows tr[data-id='1'] .ctx")
    assert whole.text.startswith("a whole sentence, no token known") and not whole.find_elements(By.TAG_NAME, "mark")
    first = rows(driver)[0].find_elements(By.TAG_NAME, "td")
    assert first[5].text == "\u2013" and first[7].text == "\u2013"  # None and NaN contribution / stability

    type_query(driver, "verb")  # label: ids 10-19
    wait_for(lambda: row_ids(driver) == list(range(10, 20)))
    type_query(driver, "BANK")  # activating word, case-insensitive: ids 0, 5, ..., 45
    wait_for(lambda: row_ids(driver) == list(range(0, 50, 5)))
    type_query(driver, "17")  # an id: exact, not a prefix or substring
    wait_for(lambda: row_ids(driver) == [17])
    type_query(driver, "a&b")  # ids 3, 8, ..., 48
    wait_for(lambda: row_ids(driver) == list(range(3, 50, 5)))
    assert "10 of 50 features" in driver.find_element(By.ID, "status").text
    type_query(driver, "")
    wait_for(lambda: len(rows(driver)) == 50)

    purity = driver.find_element(By.CSS_SELECTOR, "th[data-key='purity']")
    purity.click()  # numbers sort descending first
    values = [float(r.find_element(By.CSS_SELECTOR, "td[data-key='purity']").text) for r in rows(driver)]
    assert values == sorted(values, reverse=True) and values[0] > values[-1]
    assert purity.get_attribute("aria-sort") == "descending"
    purity.click()
    values = [float(r.find_element(By.CSS_SELECTOR, "td[data-key='purity']").text) for r in rows(driver)]
    assert values == sorted(values) and purity.get_attribute("aria-sort") == "ascending"
    driver.find_element(By.CSS_SELECTOR, "th[data-key='contribution']").click()  # nulls last
    assert row_ids(driver)[:3] == [49, 47, 46] and row_ids(driver)[-13:] == list(range(0, 50, 4))
    driver.find_element(By.CSS_SELECTOR, "th[data-key='purity']").click()
    assert severe(driver) == []

    shot = tmp_path / "feature_browser.png"
    assert driver.save_screenshot(str(shot))
    data = shot.read_bytes()
    assert len(data) > 10_000 and data[:8] == b"\x89PNG\r\n\x1a\n"


def test_browser_paginates_16k_features(driver, tmp_path):
    from selenium.webdriver.common.by import By

    path = write_feature_browser(synthetic_features(16384, n_contexts=2), tmp_path / "big.html", "16k", {})
    start = time.perf_counter()
    driver.get(path.as_uri())
    load_s = time.perf_counter() - start
    assert len(rows(driver)) == 200 and "page 1 / 82" in driver.find_element(By.ID, "status").text
    driver.find_element(By.ID, "next").click()
    assert row_ids(driver)[0] == 200 and len(rows(driver)) == 200
    type_query(driver, "verb")  # ids with i // 10 % 5 == 1: 3280 of them, back to page 1
    wait_for(lambda: "3280 of 16384" in driver.find_element(By.ID, "status").text)
    assert len(rows(driver)) == 200 and row_ids(driver)[0] == 10
    assert severe(driver) == []
    assert load_s < 10, f"loading 16k features took {load_s:.1f} s"
