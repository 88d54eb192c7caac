"""The flash backend in small modules, imports running downwards:

``backend.py``   :class:`~.backend.FlashGpuBackend`: settings, plan cache, launches, errors
``workspace.py`` the shared workspace, error record and base argument block of one rank
``plan.py``      :func:`~.plan.select_plan`: every kernel-selection decision, pure
``table.py``     the tuning table: sections per card/world/transport, candidate lists per class
``layout.py``    every workspace offset, and the kernels' argument/error record mirrors
``kernels.py``   the only reader of ``kernels_cu/``: builds (:class:`~.kernels.KernelBuild`) and loading

``flashcomm_cupy.backends.gpu`` is the entry point (:func:`~flashcomm_cupy.backends.gpu.make_gpu_backend`).
"""
