//! Our own CUDA kernels inside MLX's graph: `mlx_fast_cuda_kernel_*` (MLX's custom-kernel API,
//! which mlx-rs does not wrap) with the host costs of a decode step kept small. Kernel objects
//! and launch configurations are made once per thread and reused, and kernel sources travel to
//! NVRTC as `#include` lines of files written once, since MLX rebuilds a custom kernel's source
//! text on every call. The fused decode attention (`mlx_kv::attention::fused`) and the weight
//! matvec ([`crate::qmv`]) launch through [`run_kernel`]. CUDA builds only: on the CPU and Metal
//! backends the callers never get here.

use crate::{ExtError, Result};
use mlx_rs::{Array, Dtype};
use std::ffi::CString;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

static POISON: AtomicBool = AtomicBool::new(false);

/// Fill the kernels' outputs with NaN before they run, so an element a kernel fails to write
/// shows up as NaN (for correctness checks; it costs one fill per output, so it is off by
/// default).
pub fn poison_outputs(on: bool) {
    POISON.store(on, Ordering::Relaxed);
}


fn vec_string(names: &[&str]) -> mlx_sys::mlx_vector_string {
    unsafe {
        let v = mlx_sys::mlx_vector_string_new();
        for n in names {
            let c = CString::new(*n).expect("kernel argument names have no NUL");
            mlx_sys::mlx_vector_string_append_value(v, c.as_ptr());
        }
        v
    }
}

fn check(rc: i32, what: &str) -> Result<()> {
    if rc != 0 {
        return Err(ExtError::Primitive(format!("custom CUDA kernel: {what} failed")));
    }
    Ok(())
}

/// One custom kernel: its header, source body and argument names.
pub struct KernelDef {
    /// The kernel's name before the hash of its source.
    pub stem: &'static str,
    /// Helpers MLX puts before the generated kernel function (includes, device functions).
    pub header: &'static str,
    /// Prepended to the body (`#define`s that pick a variant).
    pub defines: &'static str,
    pub body: &'static str,
    pub inputs: &'static [&'static str],
    pub outputs: &'static [&'static str],
}


/// A kernel object made once per definition and thread: `mlx_fast_cuda_kernel_new` scans the
/// source for every argument name (shape parameters) and copies it, which a decode step
/// should not pay twice per layer. Never freed: there are a few per thread (one per definition
/// and variant), alive for the thread.
#[derive(Clone, Copy)]
struct KernelHandle {
    raw: mlx_sys::mlx_fast_cuda_kernel,
}

fn kernel_handle(def: &KernelDef, variant: &'static str) -> KernelHandle {
    thread_local! {
        static KERNELS: std::cell::RefCell<Vec<(&'static str, &'static str, KernelHandle)>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    KERNELS.with(|k| {
        if let Some((_, _, h)) = k.borrow().iter().find(|(s, v, _)| *s == def.stem && *v == variant) {
            return *h;
        }
        let source = [def.defines, variant, def.body].concat();
        // Kernel names carry a hash of the source: MLX caches compiled kernels on disk by
        // name (`/tmp/mlx/<version>/ptx`), so a changed source under an old name would run
        // stale code.
        let hash = {
            let mut h = fnv::FnvHasher::default();
            std::hash::Hasher::write(&mut h, [def.header, &source].concat().as_bytes());
            std::hash::Hasher::finish(&h)
        };
        let name = CString::new(format!("{}_{hash:016x}", def.stem)).expect("kernel names have no NUL");
        let (header, source) = match include_files(def, &source, hash) {
            Some(small) => small,
            None => (def.header.to_string(), source),
        };
        let source = CString::new(source).expect("kernel sources have no NUL");
        let header = CString::new(header).expect("kernel sources have no NUL");
        let (ins, outs) = (vec_string(def.inputs), vec_string(def.outputs));
        // ensure_row_contiguous: the kernels index flat buffers; contiguous inputs pass as is
        // (the step kernel writes into the cache buffers it is given, which are contiguous by
        // construction: see `KvCache::fused_step`).
        let raw = unsafe { mlx_sys::mlx_fast_cuda_kernel_new(name.as_ptr(), ins, outs, source.as_ptr(), header.as_ptr(), true, 0) };
        unsafe {
            mlx_sys::mlx_vector_string_free(ins);
            mlx_sys::mlx_vector_string_free(outs);
        }
        let h = KernelHandle { raw };
        k.borrow_mut().push((def.stem, variant, h));
        h
    })
}

/// The kernel's header and body written to files once, and the `#include` lines that stand
/// for them: MLX rebuilds a custom kernel's full source text (header + body, ~15 KB here) on
/// every call, which costs host time twice per layer and decode step; NVRTC reads the files
/// only when it compiles. The body line names the shape parameters the body uses, because
/// MLX passes an input's shape only when the source text mentions `<input>_shape`.
/// `None` (inline sources) if the files cannot be written.
pub fn include_files(def: &KernelDef, source: &str, hash: u64) -> Option<(String, String)> {
    let dir = std::env::temp_dir().join(format!("kvsplit-kernels-{hash:016x}"));
    let write = |name: &str, text: &str| -> Option<String> {
        let path = dir.join(name);
        if std::fs::read_to_string(&path).ok().as_deref() != Some(text) {
            std::fs::create_dir_all(&dir).ok()?;
            let tmp = dir.join(format!("{name}.{}.tmp", std::process::id()));
            std::fs::write(&tmp, text).ok()?;
            std::fs::rename(&tmp, &path).ok()?;
        }
        let path = path.to_str()?.to_string();
        (!path.contains('"')).then_some(path)
    };
    let header = write("common.cuh", def.header)?;
    let body = write(&format!("{}.cu", def.stem), source)?;
    let shapes: Vec<String> = def.inputs.iter().map(|n| format!("{n}_shape")).filter(|n| source.contains(n.as_str())).collect();
    Some((format!("#include \"{header}\"\n"), format!("// uses: {}\n#include \"{body}\"\n", shapes.join(" "))))
}

/// Template arguments by name; names are `'static` and turned into C strings once.
fn c_name(n: &'static str) -> &'static std::ffi::CStr {
    static NAMES: OnceLock<std::sync::Mutex<Vec<(&'static str, &'static std::ffi::CStr)>>> = OnceLock::new();
    let mut names = NAMES.get_or_init(Default::default).lock().expect("name table");
    if let Some((_, c)) = names.iter().find(|(s, _)| *s == n) {
        return c;
    }
    let c: &'static std::ffi::CStr = Box::leak(CString::new(n).expect("template names have no NUL").into_boxed_c_str());
    names.push((n, c));
    c
}

/// One output of a custom kernel.
pub struct Out<'a> {
    pub shape: &'a [i32],
    pub dtype: Dtype,
}

/// Runs a custom CUDA kernel on the default GPU stream. `grid` counts threads (MLX divides it
/// by `threads`), as in Metal's dispatchThreads. `inputs` and `outputs` follow `def`'s names;
/// `variant` (`#define` lines, or empty) picks a compiled variant of the same definition.
#[allow(clippy::too_many_arguments)]
pub fn run_kernel(
    def: &KernelDef,
    variant: &'static str,
    inputs: &[&Array],
    outputs: &[Out],
    grid: (i32, i32),
    threads: i32,
    ints: &[(&'static str, i32)],
    types: &[(&'static str, Dtype)],
) -> Result<Vec<Array>> {
    debug_assert_eq!(inputs.len(), def.inputs.len());
    debug_assert_eq!(outputs.len(), def.outputs.len());
    let kernel = kernel_handle(def, variant);
    let dtype = |d: Dtype| d as mlx_sys::mlx_dtype;
    let poison = POISON.load(Ordering::Relaxed);
    // Launch configurations repeat from layer to layer and step to step (the split count
    // changes rarely): build each once per thread.
    let mut key: Vec<i64> = vec![def.stem.as_ptr() as i64, variant.as_ptr() as i64, poison as i64, grid.0 as i64, grid.1 as i64, threads as i64];
    key.extend(ints.iter().map(|(_, v)| *v as i64));
    key.extend(types.iter().map(|(_, d)| *d as i64));
    for o in outputs {
        key.push(o.dtype as i64);
        key.push(o.shape.len() as i64);
        key.extend(o.shape.iter().map(|&x| x as i64));
    }
    thread_local! {
        static CONFIGS: std::cell::RefCell<std::collections::HashMap<Vec<i64>, ConfigHandle>> = Default::default();
    }
    let cached = CONFIGS.with(|c| c.borrow().get(&key).copied());
    unsafe {
        let cfg = match cached {
            Some(c) => c.raw,
            None => {
                if crate::host_profile::enabled() {
                    crate::host_profile::new_launch(def.stem, variant, ints, types, grid);
                }
                let cfg = mlx_sys::mlx_fast_cuda_kernel_config_new();
                let built = (|| -> Result<()> {
                    for o in outputs {
                        check(mlx_sys::mlx_fast_cuda_kernel_config_add_output_arg(cfg, o.shape.as_ptr(), o.shape.len(), dtype(o.dtype)), "output")?;
                    }
                    check(mlx_sys::mlx_fast_cuda_kernel_config_set_grid(cfg, grid.0, grid.1, 1), "grid")?;
                    check(mlx_sys::mlx_fast_cuda_kernel_config_set_thread_group(cfg, threads, 1, 1), "thread group")?;
                    if poison {
                        check(mlx_sys::mlx_fast_cuda_kernel_config_set_init_value(cfg, f32::NAN), "init value")?;
                    }
                    for (n, val) in ints {
                        check(mlx_sys::mlx_fast_cuda_kernel_config_add_template_arg_int(cfg, c_name(n).as_ptr(), *val), "template arg")?;
                    }
                    for (n, d) in types {
                        check(mlx_sys::mlx_fast_cuda_kernel_config_add_template_arg_dtype(cfg, c_name(n).as_ptr(), dtype(*d)), "template dtype")?;
                    }
                    Ok(())
                })();
                if let Err(e) = built {
                    mlx_sys::mlx_fast_cuda_kernel_config_free(cfg);
                    return Err(e);
                }
                CONFIGS.with(|c| {
                    let mut c = c.borrow_mut();
                    // Bounded: shapes that stop recurring (other depths, other models) are
                    // dropped all at once.
                    if c.len() >= 256 {
                        for (_, old) in c.drain() {
                            mlx_sys::mlx_fast_cuda_kernel_config_free(old.raw);
                        }
                    }
                    c.insert(key, ConfigHandle { raw: cfg });
                });
                cfg
            }
        };
        {
            let ins = mlx_sys::mlx_vector_array_new();
            for a in inputs {
                mlx_sys::mlx_vector_array_append_value(ins, a.as_ptr());
            }
            let mut outs = mlx_sys::mlx_vector_array_new();
            let stream = mlx_sys::mlx_default_gpu_stream_new();
            let t0 = crate::host_profile::enabled().then(std::time::Instant::now);
            let rc = mlx_sys::mlx_fast_cuda_kernel_apply(&mut outs, kernel.raw, ins, cfg, stream);
            if let Some(t0) = t0 {
                crate::host_profile::add_apply(t0.elapsed().as_nanos() as u64);
            }
            mlx_sys::mlx_stream_free(stream);
            mlx_sys::mlx_vector_array_free(ins);
            if rc != 0 {
                mlx_sys::mlx_vector_array_free(outs);
                return Err(ExtError::Primitive(format!("custom CUDA kernel {}: apply failed", def.stem)));
            }
            let mut got = Vec::with_capacity(outputs.len());
            for i in 0..outputs.len() {
                let mut a = mlx_sys::mlx_array_new();
                mlx_sys::mlx_vector_array_get(&mut a, outs, i);
                got.push(Array::from_ptr(a));
            }
            mlx_sys::mlx_vector_array_free(outs);
            Ok(got)
        }
    }
}

/// A launch configuration kept for reuse (see [`run_kernel`]).
#[derive(Clone, Copy)]
struct ConfigHandle {
    raw: mlx_sys::mlx_fast_cuda_kernel_config,
}
