"""A real headless browser for the page tests: playwright's own Chromium where it is installed, else the
system's (Debian's ``chromium``, which .ci/run installs with apt-get; or ``SLM_BROWSER``). Without one the
test skips, except in CI (``CI`` set), where it fails: a browser test that never runs there tests nothing.

``python tests/support/browser.py`` prints which browser the tests will use (.ci/run does, into its log)."""

import os
import shutil
from contextlib import contextmanager


def system_browser() -> str | None:
    return os.environ.get("SLM_BROWSER") or shutil.which("chromium") or shutil.which("chromium-browser")


@contextmanager
def real_browser():
    """A launched playwright browser (closed on exit); skips (fails in CI) when none can be had."""
    import pytest

    def missing(why: str):
        if os.environ.get("CI"):
            pytest.fail(f"no browser for the page test in CI: {why}")
        pytest.skip(why)

    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing("playwright is not installed")
    with sync_playwright() as pw:
        try:
            browser = pw.chromium.launch()
        except Exception as e:  # its own Chromium was never downloaded (no network for it)
            if "Executable doesn't exist" not in str(e):
                raise
            path = system_browser()
            if path is None:
                missing("neither playwright's Chromium nor a system chromium is installed")
            browser = pw.chromium.launch(executable_path=path, args=["--no-sandbox"])  # root in CI containers
        try:
            yield browser
        finally:
            browser.close()


if __name__ == "__main__":
    try:
        from playwright.sync_api import sync_playwright

        with sync_playwright() as pw:
            try:
                b = pw.chromium.launch()
                where = "playwright's own Chromium"
            except Exception:
                b = pw.chromium.launch(executable_path=system_browser(), args=["--no-sandbox"])
                where = system_browser()
            print(f"browser for the page tests: {where}, version {b.version}")
            b.close()
    except Exception as e:
        print(f"browser for the page tests: none ({type(e).__name__}: {str(e).splitlines()[0]})")
