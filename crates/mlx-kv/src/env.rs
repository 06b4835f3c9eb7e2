//! Settings read from the environment: on/off switches and positive counts. An unusable value
//! is reported on stderr, naming the variable, and the default applies.

use std::sync::atomic::{AtomicU8, Ordering};

/// An on/off switch read from the environment once (`0` off, `1` on; anything else is reported
/// on stderr and gives the default), which a
/// process may also set (fused_check compares paths in one run). Read per layer and decode
/// step, so it must not cost an environment lookup each time.
pub struct Switch {
    var: &'static str,
    default: bool,
    /// 0: not read yet, 1: off, 2: on.
    state: AtomicU8,
}

impl Switch {
    pub const fn new(var: &'static str, default: bool) -> Self {
        Switch { var, default, state: AtomicU8::new(0) }
    }

    pub fn get(&self) -> bool {
        match self.state.load(Ordering::Relaxed) {
            1 => false,
            2 => true,
            _ => {
                let on = match std::env::var(self.var).as_deref() {
                    Ok("0") => false,
                    Ok("1") => true,
                    Ok(other) => {
                        eprintln!("warning: {}={other:?} is neither 0 nor 1; ignored ({})", self.var, if self.default { "on" } else { "off" });
                        self.default
                    }
                    Err(_) => self.default,
                };
                self.set(on);
                on
            }
        }
    }

    pub fn set(&self, on: bool) {
        self.state.store(if on { 2 } else { 1 }, Ordering::Relaxed);
    }
}

/// A positive whole number from the environment variable `name`; any other value is reported on
/// stderr, naming the variable, and ignored (the caller's default applies).
pub fn positive(name: &str) -> Option<usize> {
    let v = std::env::var(name).ok()?;
    match v.parse::<usize>() {
        Ok(n) if n >= 1 => Some(n),
        _ => {
            eprintln!("warning: {name}={v:?} is not a positive whole number; ignored");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn switches_take_0_and_1_and_fall_back_to_their_default_on_anything_else() {
        for (value, default, want) in [("0", true, false), ("1", false, true), ("yes", true, true), ("on", false, false), ("", true, true)] {
            let var: &'static str = Box::leak(format!("KVSPLIT_TEST_SWITCH_{}_{default}", value.len()).into_boxed_str());
            std::env::set_var(var, value);
            let sw = Switch::new(var, default);
            assert_eq!(sw.get(), want, "{var}={value:?} (default {default})");
            std::env::set_var(var, if want { "0" } else { "1" });
            assert_eq!(sw.get(), want, "{var}: read once, not per call");
            sw.set(!want);
            assert_eq!(sw.get(), !want, "{var}: set() overrides");
        }
    }
}
