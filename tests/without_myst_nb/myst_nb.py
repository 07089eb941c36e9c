"""Put first on PYTHONPATH, this makes `import myst_nb` fail as it does on Colab or in a plain
Jupyter install: `make test-notebooks` executes every chapter so, proving that the chapters
need nothing beyond trlib-torch[data,plot] (the book build, `make book`, keeps the real myst-nb)."""

raise ImportError("myst_nb is hidden from this kernel: the chapters must run without it (see tests/without_myst_nb)")
