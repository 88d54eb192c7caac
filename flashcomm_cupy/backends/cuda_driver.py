"""The few CUDA driver-API calls the transports need and CuPy does not wrap, through ctypes.

Signatures, structure layouts and enum values are those of ``cuda.h``
(CUDA 12/13; ``sizeof(CUmemAllocationProp)`` is 32 with ``location`` at 8,
``win32HandleMetaData`` at 16 and ``allocFlags`` at 24 on 64-bit Linux,
``sizeof(CUmemAccessDesc)`` 12).  Versioned entry points are called by their
exported names (``cuMemHostRegister_v2``, ...), as ``cuda.h``'s macros do.

Every call acts on the calling thread's current context, which CuPy's
``Device.use()`` makes the device's primary context.
"""
from __future__ import annotations

import ctypes
from ctypes import POINTER, byref, c_char_p, c_int, c_size_t, c_uint, c_ulonglong, c_void_p

CUdeviceptr = c_ulonglong
CUmemHandle = c_ulonglong  # CUmemGenericAllocationHandle

# cuda.h values
CU_MEMHOSTREGISTER_PORTABLE = 0x01
CU_MEMHOSTREGISTER_DEVICEMAP = 0x02
CU_DEVICE_ATTRIBUTE_CAN_MAP_HOST_MEMORY = 19
CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED = 102
CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED = 103
CU_MEM_ALLOCATION_TYPE_PINNED = 0x1
CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR = 0x1
CU_MEM_LOCATION_TYPE_DEVICE = 0x1
CU_MEM_ACCESS_FLAGS_PROT_READWRITE = 0x3
CU_MEM_ALLOC_GRANULARITY_MINIMUM = 0x0


class CUmemLocation(ctypes.Structure):
    _fields_ = [("type", c_int), ("id", c_int)]


class _AllocFlags(ctypes.Structure):
    _fields_ = [("compressionType", ctypes.c_ubyte), ("gpuDirectRDMACapable", ctypes.c_ubyte),
                ("usage", ctypes.c_ushort), ("reserved", ctypes.c_ubyte * 4)]


class CUmemAllocationProp(ctypes.Structure):
    _fields_ = [("type", c_int), ("requestedHandleTypes", c_int), ("location", CUmemLocation),
                ("win32HandleMetaData", c_void_p), ("allocFlags", _AllocFlags)]


class CUmemAccessDesc(ctypes.Structure):
    _fields_ = [("location", CUmemLocation), ("flags", c_int)]


_SIGNATURES = {
    "cuGetErrorString": (c_int, POINTER(c_char_p)),
    "cuDeviceGet": (POINTER(c_int), c_int),
    "cuDeviceGetAttribute": (POINTER(c_int), c_int, c_int),
    "cuMemHostRegister_v2": (c_void_p, c_size_t, c_uint),
    "cuMemHostUnregister": (c_void_p,),
    "cuMemHostGetDevicePointer_v2": (POINTER(CUdeviceptr), c_void_p, c_uint),
    "cuMemGetAllocationGranularity": (POINTER(c_size_t), POINTER(CUmemAllocationProp), c_int),
    "cuMemCreate": (POINTER(CUmemHandle), c_size_t, POINTER(CUmemAllocationProp), c_ulonglong),
    "cuMemRelease": (CUmemHandle,),
    "cuMemExportToShareableHandle": (c_void_p, CUmemHandle, c_int, c_ulonglong),
    "cuMemImportFromShareableHandle": (POINTER(CUmemHandle), c_void_p, c_int),
    "cuMemAddressReserve": (POINTER(CUdeviceptr), c_size_t, c_size_t, CUdeviceptr, c_ulonglong),
    "cuMemAddressFree": (CUdeviceptr, c_size_t),
    "cuMemMap": (CUdeviceptr, c_size_t, c_size_t, CUmemHandle, c_ulonglong),
    "cuMemUnmap": (CUdeviceptr, c_size_t),
    "cuMemSetAccess": (CUdeviceptr, c_size_t, POINTER(CUmemAccessDesc), c_size_t),
}


class CudaDriverError(RuntimeError):
    """A CUDA driver call failed; the message names the call and the driver's error string."""


_lib = None


def _driver():
    global _lib
    if _lib is None:
        lib = ctypes.CDLL("libcuda.so.1")
        for name, argtypes in _SIGNATURES.items():
            fn = getattr(lib, name)
            fn.argtypes = list(argtypes)
            fn.restype = c_int
        _lib = lib
    return _lib


def call(name: str, *args) -> None:
    """Call driver function ``name``; raise :class:`CudaDriverError` unless it returns CUDA_SUCCESS."""
    lib = _driver()
    rc = getattr(lib, name)(*args)
    if rc != 0:
        text = c_char_p()
        lib.cuGetErrorString(rc, byref(text))
        detail = text.value.decode() if text.value else "unknown error"
        raise CudaDriverError(f"{name} failed: {detail} (CUresult {rc})")


def device_attribute(device_id: int, attribute: int) -> int:
    dev, value = c_int(), c_int()
    call("cuDeviceGet", byref(dev), int(device_id))
    call("cuDeviceGetAttribute", byref(value), attribute, dev)
    return value.value


# ------------------------------------------------------------------ host memory
def host_register(address: int, nbytes: int) -> int:
    """Page-lock ``nbytes`` at ``address`` for every context (portable) and map them into the
    device address space; returns the device pointer of ``address``."""
    call("cuMemHostRegister_v2", c_void_p(address), nbytes, CU_MEMHOSTREGISTER_PORTABLE | CU_MEMHOSTREGISTER_DEVICEMAP)
    dptr = CUdeviceptr()
    try:
        call("cuMemHostGetDevicePointer_v2", byref(dptr), c_void_p(address), 0)
    except CudaDriverError:
        host_unregister(address)
        raise
    return dptr.value


def host_unregister(address: int) -> None:
    call("cuMemHostUnregister", c_void_p(address))


# ------------------------------------------------------------------ virtual-memory handles
def _device_prop(device_id: int) -> CUmemAllocationProp:
    prop = CUmemAllocationProp()
    prop.type = CU_MEM_ALLOCATION_TYPE_PINNED
    prop.requestedHandleTypes = CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR
    prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE
    prop.location.id = int(device_id)
    return prop


def granularity(device_id: int) -> int:
    size = c_size_t()
    call("cuMemGetAllocationGranularity", byref(size), byref(_device_prop(device_id)), CU_MEM_ALLOC_GRANULARITY_MINIMUM)
    return size.value


def create_exportable(device_id: int, nbytes: int) -> int:
    """A physical allocation of ``nbytes`` on the device, exportable as a POSIX file descriptor."""
    handle = CUmemHandle()
    call("cuMemCreate", byref(handle), nbytes, byref(_device_prop(device_id)), 0)
    return handle.value


def export_fd(handle: int) -> int:
    fd = c_int(-1)
    call("cuMemExportToShareableHandle", ctypes.cast(byref(fd), c_void_p), handle,
         CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR, 0)
    return fd.value


def import_fd(fd: int) -> int:
    """The allocation handle behind a descriptor another process exported (the fd stays open)."""
    handle = CUmemHandle()
    call("cuMemImportFromShareableHandle", byref(handle), c_void_p(fd), CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR)
    return handle.value


def map_for_device(handle: int, nbytes: int, device_id: int) -> int:
    """Reserve an address range, map the allocation there and grant ``device_id`` read-write
    access; returns the address.  Undone by :func:`unmap`."""
    ptr = CUdeviceptr()
    call("cuMemAddressReserve", byref(ptr), nbytes, 0, 0, 0)
    try:
        call("cuMemMap", ptr, nbytes, 0, handle, 0)
        try:
            desc = CUmemAccessDesc()
            desc.location.type = CU_MEM_LOCATION_TYPE_DEVICE
            desc.location.id = int(device_id)
            desc.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE
            call("cuMemSetAccess", ptr, nbytes, byref(desc), 1)
        except CudaDriverError:
            call("cuMemUnmap", ptr, nbytes)
            raise
    except CudaDriverError:
        call("cuMemAddressFree", ptr, nbytes)
        raise
    return ptr.value


def unmap(ptr: int, nbytes: int) -> None:
    call("cuMemUnmap", CUdeviceptr(ptr), nbytes)
    call("cuMemAddressFree", CUdeviceptr(ptr), nbytes)


def release(handle: int) -> None:
    call("cuMemRelease", CUmemHandle(handle))
