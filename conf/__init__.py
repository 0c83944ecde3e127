"""The Hydra configs of slm-train and slm-score. This folder sits at the top of the repository and is
installed inside the package as ``slm.conf`` (pyproject.toml maps it), so a wheel carries it; slm.cli finds
it through that package. Your own experiment configs go in a folder of your own: see docs/training.md."""
