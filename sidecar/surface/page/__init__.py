"""The live status page at ``/``: its model (what it shows), its chart, its HTML, its assets."""
