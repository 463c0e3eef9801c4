//! `lora-cuda-check`: compile every lora-kernels CUDA module with NVRTC for each
//! architecture (default sm_80 and sm_90), check that every expected kernel is in the
//! PTX, assemble it with `ptxas -v` and print registers / spills / shared memory per
//! kernel. Exits non-zero on any compile error, missing kernel, ptxas error, or (with
//! `--max-spill-bytes N`) a spill above N bytes. Needs no GPU and no libcuda: only
//! libnvrtc (found through LD_LIBRARY_PATH) and a `ptxas` binary (`--ptxas PATH`).
//!
//! usage: lora-cuda-check [--ptxas PATH] [--arch sm_80 --arch sm_90] [--out DIR]
//!                        [--max-spill-bytes N] [--json FILE]
use std::ffi::{CStr, CString};
use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::{Command, ExitCode};

#[path = "../../../kernels/src/cuda/sources.rs"]
#[allow(dead_code)]
mod sources;

use cudarc::nvrtc::{result, sys};

struct Row {
    arch: String,
    module: String,
    kernel: String,
    registers: u32,
    spill_stores: u32,
    spill_loads: u32,
    stack: u32,
    smem: u32,
}

fn nvrtc_compile(src: &str, name: &str, opts: &[String]) -> Result<(String, String), String> {
    let csrc = CString::new(src).map_err(|e| e.to_string())?;
    let cname = CString::new(name).map_err(|e| e.to_string())?;
    let prog = result::create_program(&csrc, Some(&cname)).map_err(|e| format!("create_program: {e:?}"))?;
    let compiled = unsafe { result::compile_program(prog, opts) };
    let log = unsafe { result::get_program_log(prog) }
        .map(|raw| unsafe { CStr::from_ptr(raw.as_ptr()) }.to_string_lossy().into_owned())
        .unwrap_or_default();
    let out = match compiled {
        Err(e) => Err(format!("NVRTC {e:?}\n{log}")),
        Ok(()) => unsafe { result::get_ptx(prog) }
            .map(|raw| unsafe { CStr::from_ptr(raw.as_ptr()) }.to_string_lossy().into_owned())
            .map(|ptx| (ptx, log))
            .map_err(|e| format!("get_ptx: {e:?}")),
    };
    let _ = unsafe { result::destroy_program(prog) };
    out
}

fn num_before(line: &str, word: &str) -> Option<u32> {
    let i = line.find(word)?;
    line[..i].split_whitespace().last()?.parse().ok()
}

/// Parse `ptxas -v` output: "Compiling entry function 'X' for 'sm_80'", "Function
/// properties for X", "N bytes stack frame, N bytes spill stores, N bytes spill loads",
/// "Used N registers, ... N bytes smem ...".
fn parse_ptxas(arch: &str, module: &str, text: &str) -> Vec<Row> {
    let mut rows: Vec<Row> = Vec::new();
    let mut cur: Option<Row> = None;
    for line in text.lines() {
        if let Some(i) = line.find("Compiling entry function '") {
            if let Some(r) = cur.take() {
                rows.push(r);
            }
            let rest = &line[i + "Compiling entry function '".len()..];
            let kernel = rest.split('\'').next().unwrap_or("").to_string();
            cur = Some(Row {
                arch: arch.into(), module: module.into(), kernel, registers: 0, spill_stores: 0,
                spill_loads: 0, stack: 0, smem: 0,
            });
        } else if let Some(r) = cur.as_mut() {
            if line.contains("spill stores") {
                r.stack = num_before(line, "bytes stack frame").unwrap_or(0);
                r.spill_stores = num_before(line, "bytes spill stores").unwrap_or(0);
                r.spill_loads = num_before(line, "bytes spill loads").unwrap_or(0);
            } else if line.contains("Used") && line.contains("registers") {
                r.registers = num_before(line, "registers").unwrap_or(0);
                r.smem = num_before(line, "bytes smem").unwrap_or(0);
            }
        }
    }
    if let Some(r) = cur.take() {
        rows.push(r);
    }
    rows
}

fn main() -> ExitCode {
    let mut archs: Vec<String> = Vec::new();
    let mut ptxas: Option<PathBuf> = None;
    let mut out_dir = std::env::temp_dir().join("lora-cuda-check");
    let mut max_spill: Option<u32> = None;
    let mut json_out: Option<PathBuf> = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().unwrap_or_else(|| { eprintln!("{a} needs a value"); std::process::exit(2) });
        match a.as_str() {
            "--arch" => archs.push(val()),
            "--ptxas" => ptxas = Some(val().into()),
            "--out" => out_dir = val().into(),
            "--max-spill-bytes" => max_spill = val().parse().ok(),
            "--json" => json_out = Some(val().into()),
            "-h" | "--help" => {
                println!("usage: lora-cuda-check [--ptxas PATH] [--arch sm_XY]... [--out DIR] [--max-spill-bytes N] [--json FILE]");
                return ExitCode::SUCCESS;
            }
            other => { eprintln!("unknown argument {other}"); return ExitCode::from(2); }
        }
    }
    if archs.is_empty() {
        archs = sources::CI_ARCHS.iter().map(|s| s.to_string()).collect();
    }
    // cudarc panics when the library is missing: check first.
    if !unsafe { sys::is_culib_present() } {
        eprintln!("error: libnvrtc not found; put the directory holding libnvrtc.so(.12) on LD_LIBRARY_PATH");
        return ExitCode::FAILURE;
    }
    let (mut maj, mut min) = (0, 0);
    unsafe { sys::nvrtcVersion(&mut maj, &mut min) };
    println!("NVRTC {maj}.{min}; ptxas: {}", ptxas.as_ref().map(|p| p.display().to_string()).unwrap_or("(none, PTX only)".into()));
    if let Some(p) = &ptxas {
        if let Ok(o) = Command::new(p).arg("--version").output() {
            if let Some(l) = String::from_utf8_lossy(&o.stdout).lines().last() { println!("{l}"); }
        }
    }
    std::fs::create_dir_all(&out_dir).expect("create out dir");
    let mut failures: Vec<String> = Vec::new();
    let mut rows: Vec<Row> = Vec::new();
    for arch in &archs {
        for m in sources::MODULES {
            let t0 = std::time::Instant::now();
            let src = sources::full_source(m);
            let opts = sources::nvrtc_options(arch);
            let (ptx, log) = match nvrtc_compile(&src, &format!("{}.cu", m.name), &opts) {
                Ok(x) => x,
                Err(e) => { failures.push(format!("{arch} {}: {e}", m.name)); eprintln!("FAIL {arch} {}:\n{e}", m.name); continue; }
            };
            let t_nvrtc = t0.elapsed().as_secs_f64();
            if !log.trim().is_empty() {
                eprintln!("NVRTC log {arch} {}:\n{}", m.name, log.trim());
                if log.contains("warning") {
                    failures.push(format!("{arch} {}: NVRTC warnings (see log)", m.name));
                }
            }
            for k in m.kernels {
                if !ptx.contains(&format!(".entry {k}(")) {
                    failures.push(format!("{arch} {}: kernel {k} missing from PTX", m.name));
                }
            }
            let ptx_path = out_dir.join(format!("{}.{arch}.ptx", m.name));
            std::fs::write(&ptx_path, &ptx).expect("write ptx");
            let mut t_ptxas = 0.0;
            if let Some(p) = &ptxas {
                let t1 = std::time::Instant::now();
                let cubin = out_dir.join(format!("{}.{arch}.cubin", m.name));
                let o = Command::new(p)
                    .args(["-v", "--warn-on-spills", &format!("-arch={arch}"), "-o"])
                    .arg(&cubin)
                    .arg(&ptx_path)
                    .output();
                t_ptxas = t1.elapsed().as_secs_f64();
                match o {
                    Err(e) => failures.push(format!("{arch} {}: cannot run ptxas: {e}", m.name)),
                    Ok(o) => {
                        let text = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
                        if !o.status.success() {
                            failures.push(format!("{arch} {}: ptxas failed", m.name));
                            eprintln!("ptxas {arch} {}:\n{text}", m.name);
                        }
                        let mut parsed = parse_ptxas(arch, m.name, &text);
                        if parsed.len() != m.kernels.len() && o.status.success() {
                            failures.push(format!("{arch} {}: ptxas reported {} kernels, expected {}", m.name, parsed.len(), m.kernels.len()));
                        }
                        rows.append(&mut parsed);
                    }
                }
            }
            println!("ok {arch} {:<14} {} kernels  nvrtc {t_nvrtc:.2}s  ptxas {t_ptxas:.2}s", m.name, m.kernels.len());
        }
    }
    if !rows.is_empty() {
        println!("\n{:<6} {:<24} {:>4} {:>11} {:>11} {:>6} {:>6}", "arch", "kernel", "regs", "spill st B", "spill ld B", "stack", "smem");
        let mut json = String::from("[");
        for r in &rows {
            println!("{:<6} {:<24} {:>4} {:>11} {:>11} {:>6} {:>6}", r.arch, r.kernel, r.registers, r.spill_stores, r.spill_loads, r.stack, r.smem);
            if let Some(max) = max_spill {
                if r.spill_stores.max(r.spill_loads) > max {
                    failures.push(format!("{} {}: spills {} / {} bytes > {max}", r.arch, r.kernel, r.spill_stores, r.spill_loads));
                }
            }
            let _ = write!(json, "{}{{\"arch\":\"{}\",\"module\":\"{}\",\"kernel\":\"{}\",\"registers\":{},\"spill_stores\":{},\"spill_loads\":{},\"stack\":{},\"smem\":{}}}",
                if json.len() > 1 { "," } else { "" }, r.arch, r.module, r.kernel, r.registers, r.spill_stores, r.spill_loads, r.stack, r.smem);
        }
        json.push(']');
        if let Some(j) = json_out { std::fs::write(j, json).expect("write json"); }
    }
    if failures.is_empty() {
        println!("\ncuda-check: all {} modules x {} archs compiled and assembled", sources::MODULES.len(), archs.len());
        ExitCode::SUCCESS
    } else {
        eprintln!("\ncuda-check: {} failure(s):", failures.len());
        for f in &failures { eprintln!("  {f}"); }
        ExitCode::FAILURE
    }
}
