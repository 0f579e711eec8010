//! Free memory of a CUDA device, from NVIDIA's management library (NVML, `libnvidia-ml.so.1`,
//! installed with every NVIDIA driver), loaded at run time: a machine without it (the CPU, CI)
//! reads `None`, and placement goes on by queue depth alone.
//!
//! NVML numbers devices by PCI bus order; CUDA's `cuda:N` counts the devices it sees, so with
//! `CUDA_VISIBLE_DEVICES` (numbers) `cuda:N` is the N-th one listed. (CUDA orders the rest
//! fastest first: the same as bus order on the identical GPUs of one instance type.)

use std::{
    ffi::{c_int, c_uint, c_ulonglong, c_void},
    sync::OnceLock,
};

use super::runtime::Device;

#[repr(C)]
#[derive(Default)]
struct NvmlMemory {
    total: c_ulonglong,
    free: c_ulonglong,
    used: c_ulonglong,
}

type Init = unsafe extern "C" fn() -> c_int;
type HandleByIndex = unsafe extern "C" fn(c_uint, *mut *mut c_void) -> c_int;
type MemoryInfo = unsafe extern "C" fn(*mut c_void, *mut NvmlMemory) -> c_int;

struct Nvml {
    handle_by_index: HandleByIndex,
    memory_info: MemoryInfo,
    /// Keeps the functions above loaded.
    _library: libloading::Library,
}

/// NVML, initialized once; `None` where it is missing or does not start.
fn nvml() -> Option<&'static Nvml> {
    static NVML: OnceLock<Option<Nvml>> = OnceLock::new();
    NVML.get_or_init(|| {
        // SAFETY: loading NVIDIA's library runs no initializers beyond its own; the symbols are
        // NVML's documented C API, with the signatures declared above.
        unsafe {
            let library = libloading::Library::new("libnvidia-ml.so.1").ok()?;
            let init: Init = *library.get::<Init>(b"nvmlInit_v2\0").ok()?;
            let handle_by_index: HandleByIndex =
                *library.get::<HandleByIndex>(b"nvmlDeviceGetHandleByIndex_v2\0").ok()?;
            let memory_info: MemoryInfo = *library.get::<MemoryInfo>(b"nvmlDeviceGetMemoryInfo\0").ok()?;
            if init() != 0 {
                tracing::warn!("NVML did not start: device free memory is unknown to placement");
                return None;
            }
            Some(Nvml { handle_by_index, memory_info, _library: library })
        }
    })
    .as_ref()
}

/// The NVML index of `cuda:id`, given `CUDA_VISIBLE_DEVICES`.
fn nvml_index(id: i32, visible: Option<&str>) -> Option<u32> {
    match visible.map(str::trim).filter(|list| !list.is_empty()) {
        None => u32::try_from(id).ok(),
        Some(list) => list.split(',').nth(usize::try_from(id).ok()?)?.trim().parse().ok(),
    }
}

/// Free and total memory of `device` in bytes; `None` for the CPU or without NVML.
pub fn memory(device: Device) -> Option<(u64, u64)> {
    let Device::Cuda(id) = device else { return None };
    let index = nvml_index(id, std::env::var("CUDA_VISIBLE_DEVICES").ok().as_deref())?;
    let nvml = nvml()?;
    let mut handle = std::ptr::null_mut();
    let mut memory = NvmlMemory::default();
    // SAFETY: NVML was initialized; `handle` and `memory` are valid for writes.
    unsafe {
        if (nvml.handle_by_index)(index, &mut handle) != 0 || (nvml.memory_info)(handle, &mut memory) != 0 {
            return None;
        }
    }
    Some((memory.free, memory.total))
}

/// Free memory of `device` in bytes, where known.
pub fn free(device: Device) -> Option<u64> {
    memory(device).map(|(free, _)| free)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuda_devices_map_through_the_visible_list() {
        assert_eq!(nvml_index(1, None), Some(1));
        assert_eq!(nvml_index(0, Some("")), Some(0));
        assert_eq!(nvml_index(1, Some("3, 5")), Some(5));
        assert_eq!(nvml_index(2, Some("3,5")), None, "not visible");
        assert_eq!(nvml_index(0, Some("GPU-8f3c")), None, "a UUID is not an index");
    }

    #[test]
    fn the_cpu_has_no_device_memory() {
        assert_eq!(free(Device::Cpu), None);
    }
}
