"""The model files: which are needed, where they are on this machine, and downloading the rest.

Where each component is looked for, in this order:

1. an explicit path (``explicit={"transformer": ..., ...}``); it must exist.
2. a models folder (``models_dir``) laid out like the two repos (see ``catalogue.py``).
3. the Hugging Face cache (``HF_HUB_CACHE``, by default ``$HF_HOME/hub``, i.e.
   ``~/.cache/huggingface/hub``), read by huggingface_hub itself with ``local_files_only=True``.
4. a download, only when ``allow_download`` is true: exactly the files the catalogue lists, into
   ``models_dir`` (same layout) when one is given, else into the Hugging Face cache.

A ``.safetensors`` file whose header describes more data than the file holds (a copy or download that
stopped part-way) does not count as present.

Modules: ``catalogue`` (what is needed, from which repo, where it goes), ``safetensors_header`` (is a
file complete), ``checkpoint_parts`` (which parts an all-in-one checkpoint holds), ``local_search`` (steps 1-3, ``find_model_paths``), ``download`` (step 4,
``resolve_model_paths``, ``download_models``) and ``hub_errors`` (Hub failures worded with their fix).

None of it imports torch: the worker's download child and ``doctor`` use it in a Python that may
have no torch. Its errors are the pipeline's (``pipeline/errors.py``, which is torch-free too), so
the worker reports a missing file the same way whether it was found missing here or while loading.
"""
