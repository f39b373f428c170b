"""The status page in a real browser (headless Chromium driven by Selenium).

A package so that its conftest is imported as ``browser.conftest``: a second top-level
``conftest`` module would replace ``tests/conftest.py`` in ``sys.modules`` and break the
``from conftest import ...`` lines of the other tiers.
"""
