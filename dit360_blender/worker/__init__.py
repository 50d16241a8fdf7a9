"""The model worker: a separate process that runs the DiT360 pipeline behind a loopback socket.

Started by `dit360_blender.client` as ``python -m <package>.worker`` so that torch, the model and
its GPU memory live outside Blender; speaks `dit360_blender.protocol`. Importing this package
imports nothing heavy: torch is imported by `__main__.main` once the socket listens.
"""
