"""lm-eval task definitions (YAML + utils.py) for the offline zero-shot tasks."""
