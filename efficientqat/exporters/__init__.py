"""Writers of runtime checkpoint formats from our packed models, and independent readers that
check what was written. One module per format; :mod:`efficientqat.export` is the CLI."""
