"""Calibration that runs models on evaluation data (above the runtime): HDP thresholds in ``hdp``."""
