#!/usr/bin/env python3
"""Headless-Chromium test of the chat page that `kvsplit-mlx serve` returns at `/`.

    page_test.py URL SCREENSHOT

Drives the page the way a person would: waits for the model name, picks k8v4, sends a message
with Enter, waits for the streamed answer, checks that the KV panel shows resident bytes below
fp16's, sends a follow-up with the Send button and checks that the server's prompt cache hit,
saves a PNG screenshot, then checks that a server error (an invalid `kv`) is shown inline and
that "New conversation" clears the page. Every wait is bounded; any failure exits 1 with the
reason (and a `<SCREENSHOT>.failed.png` beside it).

Run it through scripts/page-test.sh, which provides Chromium, chromedriver and selenium.
"""

import os
import re
import shutil
import sys
import time
import urllib.request
from urllib.parse import urlparse

from selenium import webdriver
from selenium.common.exceptions import TimeoutException, WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import Select, WebDriverWait

PAGE_LOAD_S = 30
MODELS_S = 30
# One answer on a small model, CPU included, fits well inside this.
ANSWER_S = 120
ERROR_S = 30
REACH_S = 5
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
UNITS = {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9}


class Fail(Exception):
    pass


def check(cond, message):
    if not cond:
        raise Fail(message)


def text(driver, css):
    return driver.find_element(By.CSS_SELECTOR, css).text.strip()


def wait(driver, seconds, what, predicate):
    try:
        return WebDriverWait(driver, seconds, poll_frequency=0.2).until(lambda d: predicate(d))
    except TimeoutException:
        raise Fail(f"timed out after {seconds} s waiting for {what}") from None


def parse_bytes(label, s):
    """Bytes from the panel's text, e.g. '1.25 MB' -> 1250000; Fail if it is not that shape."""
    m = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)\s*(B|KB|MB|GB)", s)
    check(m is not None, f"{label} should read like '1.2 MB' once the answer is done, got {s!r}")
    return float(m.group(1)) * UNITS[m.group(2)]


def assistant_count(driver):
    return len(driver.find_elements(By.CSS_SELECTOR, "#messages .assistant"))


def error_count(driver):
    return len(driver.find_elements(By.CSS_SELECTOR, "#messages .error"))


def wait_for_answer(driver, before, turn):
    """Waits until answer number before+1 is done: status back to ready, text non-empty."""
    def done(d):
        if error_count(d):
            last = d.find_elements(By.CSS_SELECTOR, "#messages .error .body")[-1].text.strip()
            raise Fail(f"turn {turn}: the page shows an error: {last!r}")
        items = d.find_elements(By.CSS_SELECTOR, "#messages .assistant .body")
        return (len(items) == before + 1 and text(d, "#status") == "ready"
                and items[-1].text.strip() and items[-1].text.strip() != "(empty answer)")
    wait(driver, ANSWER_S, f"turn {turn}'s answer (status 'ready' and a non-empty .assistant)", done)
    return driver.find_elements(By.CSS_SELECTOR, "#messages .assistant .body")[-1].text.strip()


def send_with_enter(driver, message):
    box = driver.find_element(By.ID, "prompt")
    box.clear()
    box.send_keys(message)
    box.send_keys(Keys.ENTER)


def kv_panel(driver, turn):
    kv_text, fp_text = text(driver, "#kv-bytes"), text(driver, "#fp16-bytes")
    kv, fp16 = parse_bytes("#kv-bytes", kv_text), parse_bytes("#fp16-bytes", fp_text)
    check(kv > 0, f"turn {turn}: #kv-bytes should be positive, got {kv_text!r}")
    check(kv < fp16, f"turn {turn}: #kv-bytes ({kv_text}) should be smaller than #fp16-bytes ({fp_text}) at k8v4")
    return kv, fp16


def run(driver, url, screenshot):
    driver.set_page_load_timeout(PAGE_LOAD_S)
    driver.get(url)
    wait(driver, MODELS_S, "the model name from /v1/models and status 'ready'",
         lambda d: d.find_element(By.ID, "model").get_attribute("value") and text(d, "#status") == "ready")
    model = Select(driver.find_element(By.ID, "model")).first_selected_option.text
    print(f"page-test: model {model!r}")

    Select(driver.find_element(By.ID, "kv")).select_by_value("k8v4")
    send_with_enter(driver, "In one sentence: why store keys at 8 bits and values at 4?")
    answer = wait_for_answer(driver, 0, 1)
    kv1, fp1 = kv_panel(driver, 1)
    print(f"page-test: turn 1: {len(answer)} chars; {text(driver, '#kv-summary')}; "
          f"cache {text(driver, '#cache-status')}; {text(driver, '#tps')}")
    tps = text(driver, "#tps")
    check(re.fullmatch(r"[0-9]+(\.[0-9]+)? tok/s", tps) and float(tps.split()[0]) > 0,
          f"#tps should show the server's decode rate like '42.0 tok/s', got {tps!r}")

    box = driver.find_element(By.ID, "prompt")
    box.send_keys("And what does that save at 32k tokens of context?")
    driver.find_element(By.ID, "send").click()
    wait_for_answer(driver, 1, 2)
    kv2, _ = kv_panel(driver, 2)
    # Not strictly: a cache that allocates in steps may report the same bytes for both turns.
    check(kv2 >= kv1, f"turn 2: #kv-bytes should not shrink as the conversation grows ({kv1:.0f} -> {kv2:.0f} bytes)")
    cache = text(driver, "#cache-status")
    m = re.fullmatch(r"hit, ([0-9]+) cached tokens", cache)
    check(m is not None, f"turn 2: #cache-status should be a hit ('hit, N cached tokens'), got {cache!r}")
    check(int(m.group(1)) > 0, f"turn 2: a hit should have cached tokens, got {cache!r}")
    print(f"page-test: turn 2: {text(driver, '#kv-summary')}; cache {cache}; {text(driver, '#tps')}")
    driver.save_screenshot(screenshot)
    print(f"page-test: screenshot {screenshot}")

    # A server error is shown inline and leaves the conversation as it was. The page offers only
    # valid settings, so add an invalid one the way a stale page or a typo in a URL might.
    driver.execute_script(
        "const o = document.createElement('option'); o.value = o.textContent = 'k9v9';"
        "document.getElementById('kv').append(o);")
    Select(driver.find_element(By.ID, "kv")).select_by_value("k9v9")
    send_with_enter(driver, "This turn must fail.")
    wait(driver, ERROR_S, "an inline error for kv=k9v9 and status 'ready'",
         lambda d: error_count(d) == 1 and text(d, "#status") == "ready")
    err = text(driver, "#messages .error .body")
    check(err, "the inline error should carry the server's message, got an empty one")
    check(assistant_count(driver) == 2, "a failed turn should add no assistant message")
    check(driver.find_element(By.ID, "prompt").get_attribute("value") == "This turn must fail.",
          "a failed turn should put its message back in #prompt for a retry")
    print(f"page-test: error shown inline: {err!r}")

    Select(driver.find_element(By.ID, "kv")).select_by_value("k8v4")
    driver.find_element(By.ID, "new-conversation").click()
    check(assistant_count(driver) == 0 and error_count(driver) == 0, "New conversation should clear #messages")
    check(text(driver, "#kv-bytes") == "—" and text(driver, "#cache-status") == "—",
          "New conversation should reset the KV panel")


def main():
    if len(sys.argv) != 3:
        sys.exit("usage: page_test.py URL SCREENSHOT")
    url, screenshot = sys.argv[1], sys.argv[2]
    # Everything here is loopback, Selenium's own calls to chromedriver included; a proxy from the
    # environment would only get in the way (Selenium honours http_proxy for those calls).
    for var in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        os.environ.pop(var, None)
    host = urlparse(url).hostname
    if host not in LOOPBACK:
        sys.exit(f"page-test: FAIL: URL {url!r} is not loopback ({', '.join(sorted(LOOPBACK))}); "
                 "run the server on this machine")
    # Fail fast and plainly when nothing listens, instead of timing out on Chromium's error page.
    try:
        with urllib.request.urlopen(url, timeout=REACH_S) as res:
            check(b"id=\"messages\"" in res.read(), f"GET {url} did not return the chat page")
    except OSError as e:
        sys.exit(f"page-test: FAIL: no server answering at {url}: {e}")
    except Fail as e:
        sys.exit(f"page-test: FAIL: {e}")
    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not chromedriver:
        sys.exit("page-test: FAIL: chromium and chromedriver must be on PATH (Debian: chromium chromium-driver)")

    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,860", "--no-first-run", "--no-default-browser-check",
                "--disable-extensions", "--force-color-profile=srgb", "--no-proxy-server"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "SEVERE"})
    # An explicit chromedriver keeps Selenium Manager from trying to download one.
    service = Service(executable_path=chromedriver)
    started = time.monotonic()
    try:
        driver = webdriver.Chrome(service=service, options=opts)
    except WebDriverException as e:
        sys.exit(f"page-test: FAIL: could not start headless Chromium: {e.msg or e}")
    try:
        run(driver, url, screenshot)
    except (Fail, WebDriverException) as e:
        failed = re.sub(r"\.png$", "", screenshot) + ".failed.png"
        try:
            driver.save_screenshot(failed)
            where = f" (screenshot {failed})"
        except WebDriverException:
            where = ""
        try:
            for entry in driver.get_log("browser"):
                print(f"page-test: browser console: {entry.get('message')}", file=sys.stderr)
        except WebDriverException:
            pass
        reason = str(e) if isinstance(e, Fail) else f"WebDriver: {e.msg or e}"
        print(f"page-test: FAIL: {reason}{where}", file=sys.stderr)
        sys.exit(1)
    finally:
        driver.quit()
    print(f"page-test: PASS in {time.monotonic() - started:.1f} s")


if __name__ == "__main__":
    main()
