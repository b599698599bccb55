"""Token scorers (``score=``): one file each; ``prune/registry.py`` lists them."""
