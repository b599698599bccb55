"""Bridges to other tools: a live transformers model in and out (hf.py), lm-evaluation-harness (lm_eval.py)."""
