"""abby's benchmark suite: `python -m bench [--quick]`. Every figure is a ratio measured in one run."""
