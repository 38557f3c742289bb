//! Evaluators kept between policy decisions (regorus interpreters and VMs). Building one
//! costs more than a small decision; each holds state that its next run resets. One
//! whose run failed is dropped rather than reused, so no state an error may have left
//! behind reaches the next decision. There are as many busy at once as threads deciding
//! at once; the idle ones are bounded.

use std::sync::{Mutex, MutexGuard};

/// Idle evaluators of one kind for one policy.
pub struct Idle<T> {
    items: Mutex<Vec<T>>,
}

impl<T> Idle<T> {
    /// Most evaluators kept idle (each holds its last input and results until reused).
    const MAX: usize = 64;

    pub fn new() -> Self {
        Self {
            items: Mutex::new(Vec::new()),
        }
    }

    /// Runs `run` on an idle evaluator, or on a new one from `make`; keeps it afterwards
    /// only if the run succeeded.
    pub fn with<R, E>(
        &self,
        make: impl FnOnce() -> T,
        run: impl FnOnce(&mut T) -> Result<R, E>,
    ) -> Result<R, E> {
        let mut item = self.lock().pop().unwrap_or_else(make);
        let result = run(&mut item);
        if result.is_ok() {
            let mut idle = self.lock();
            if idle.len() < Self::MAX {
                idle.push(item);
            }
        }
        result
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> MutexGuard<'_, Vec<T>> {
        self.items.lock().unwrap_or_else(|p| p.into_inner())
    }
}
