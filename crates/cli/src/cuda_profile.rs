//! `bench --cuda-profile-range`: marks the last repeat's decode steps with the CUDA driver's
//! `cuProfilerStart` / `cuProfilerStop`, so that `ncu --profile-from-start off` (or `nsys
//! --capture-range=cudaProfilerApi`) records those steps only, not the load, the warm-up's
//! thousands of kernels or the prefill. libcuda is opened at run time: the CPU build and a
//! machine without a driver report an error instead of failing to link.

use anyhow::{bail, Result};
use std::ffi::{c_char, c_int, c_void, CStr};

extern "C" {
    fn dlopen(filename: *const c_char, flag: c_int) -> *mut c_void;
    fn dlsym(handle: *mut c_void, symbol: *const c_char) -> *mut c_void;
}
const RTLD_NOW: c_int = 2;

type CuCall = unsafe extern "C" fn() -> c_int;

fn driver_call(name: &CStr) -> Result<CuCall> {
    // SAFETY: dlopen/dlsym with NUL-terminated names; the handle is never closed, so the
    // returned function pointer stays valid for the process's life.
    unsafe {
        let lib = dlopen(c"libcuda.so.1".as_ptr(), RTLD_NOW);
        if lib.is_null() {
            bail!("--cuda-profile-range: libcuda.so.1 (the CUDA driver) could not be opened");
        }
        let f = dlsym(lib, name.as_ptr());
        if f.is_null() {
            bail!("--cuda-profile-range: libcuda.so.1 has no {}", name.to_string_lossy());
        }
        Ok(std::mem::transmute::<*mut c_void, CuCall>(f))
    }
}

/// Profiling on while this lives (the caller has evaluated everything before it).
pub struct Range(CuCall);

impl Range {
    pub fn start() -> Result<Self> {
        let start = driver_call(c"cuProfilerStart")?;
        let stop = driver_call(c"cuProfilerStop")?;
        // SAFETY: both take no arguments; MLX has initialised the driver and made a context
        // current on this thread by the time a decode step has run.
        let rc = unsafe { start() };
        if rc != 0 {
            bail!("--cuda-profile-range: cuProfilerStart returned CUDA error {rc}");
        }
        Ok(Range(stop))
    }
}

impl Drop for Range {
    fn drop(&mut self) {
        // SAFETY: as in `start`.
        let rc = unsafe { (self.0)() };
        if rc != 0 {
            eprintln!("--cuda-profile-range: cuProfilerStop returned CUDA error {rc}");
        }
    }
}
