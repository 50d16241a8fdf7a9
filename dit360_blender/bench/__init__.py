"""Speed and memory benchmark: `python -m dit360_blender.bench` (see `run.py`)."""
