//! Opt-in per-op wall-clock accounting (`LORA_KERNELS_PROFILE=1`, or
//! [`set_enabled`]). Every fused op's forward and backward opens a scope; the
//! benchmark prints the totals next to the step time, and the difference is time
//! spent in candle's own ops (adds, copies, casts, embedding, grad accumulation).
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Mutex;
use std::time::Instant;

static STATE: AtomicU8 = AtomicU8::new(0); // 0 unknown, 1 off, 2 on
static TOTALS: Mutex<BTreeMap<&'static str, (f64, u64)>> = Mutex::new(BTreeMap::new());

pub fn enabled() -> bool {
    match STATE.load(Ordering::Relaxed) {
        0 => {
            let on = std::env::var("LORA_KERNELS_PROFILE").is_ok_and(|v| !v.is_empty() && v != "0");
            STATE.store(if on { 2 } else { 1 }, Ordering::Relaxed);
            on
        }
        s => s == 2,
    }
}

pub fn set_enabled(on: bool) {
    STATE.store(if on { 2 } else { 1 }, Ordering::Relaxed);
}

pub struct Scope {
    name: &'static str,
    start: Instant,
}

impl Drop for Scope {
    fn drop(&mut self) {
        let dt = self.start.elapsed().as_secs_f64();
        let mut t = TOTALS.lock().unwrap();
        let e = t.entry(self.name).or_insert((0.0, 0));
        e.0 += dt;
        e.1 += 1;
    }
}

/// Time until the returned guard drops (nothing when profiling is off).
pub fn scope(name: &'static str) -> Option<Scope> {
    enabled().then(|| Scope { name, start: Instant::now() })
}

/// A part of an op's time (name `op/part`): inside the op's own scope, so a sum
/// over ops must skip names with a `/` ([`is_part`]).
pub fn part(name: &'static str) -> Option<Scope> {
    scope(name)
}

/// Whether a profile entry is a part of another entry's time.
pub fn is_part(name: &str) -> bool {
    name.contains('/')
}

/// (op, seconds, calls) accumulated since the last reset.
pub fn totals() -> Vec<(&'static str, f64, u64)> {
    TOTALS.lock().unwrap().iter().map(|(k, v)| (*k, v.0, v.1)).collect()
}

pub fn reset() {
    TOTALS.lock().unwrap().clear();
}
