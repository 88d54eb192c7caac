"""The kernel loader's old import path: :mod:`flashcomm_cupy.backends.flash.kernels` loads the
device code and :mod:`flashcomm_cupy.backends.flash.layout` mirrors its records."""
from .backends.flash.kernels import (BASE_OPTIONS, DEFAULT_UNIT_ELEMS, KERNEL_SOURCE, SHIPPED,  # noqa: F401
                                     UNIT_ELEMS, KernelBuild, cache_dir, function, kernel, kernel_dir,
                                     kernel_sources, load_module, module, read_source, source_digest)
from .backends.flash.layout import (ARGS_DTYPE, ERR_NODE, ERR_POISON, ERR_TIMEOUT, ERROR_FIELDS, FLAG_ROTATE,  # noqa: F401
                                    FLAG_SYM, LATE_OTHER_NODE)
