"""The techniques a recipe composes: one file each, a frozen dataclass of knobs named as its recipe keys."""
