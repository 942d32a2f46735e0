//! The event trace: the last events of a history, printed when an invariant
//! breaks so the failure can be read without replaying it.

use std::collections::VecDeque;

/// A ring of the most recent events, optionally echoed to stderr as they happen.
#[derive(Debug)]
pub struct Trace {
    ring: VecDeque<String>,
    capacity: usize,
    echo: bool,
    fingerprint: u64,
}

impl Trace {
    /// Keeps the last `capacity` events; `echo` also prints every event at once
    /// (for replaying one seed with `JAI_SIM_TRACE=1`).
    pub fn new(capacity: usize, echo: bool) -> Self {
        Self {
            ring: VecDeque::with_capacity(capacity + 1),
            capacity,
            echo,
            fingerprint: 0xCBF2_9CE4_8422_2325,
        }
    }

    /// Records one event at real simulated time `at_ms`.
    pub fn log(&mut self, at_ms: u64, text: String) {
        let line = format!("[{:>4}.{:03}s] {text}", at_ms / 1000, at_ms % 1000);
        for byte in line.bytes() {
            self.fingerprint = (self.fingerprint ^ u64::from(byte)).wrapping_mul(0x0100_0000_01B3);
        }
        if self.echo {
            eprintln!("{line}");
        }
        if self.ring.len() == self.capacity {
            self.ring.pop_front();
        }
        self.ring.push_back(line);
    }

    /// An FNV-1a hash of every line ever logged: equal for equal histories.
    pub fn fingerprint(&self) -> u64 {
        self.fingerprint
    }

    /// The recorded events, oldest first.
    pub fn lines(&self) -> Vec<String> {
        self.ring.iter().cloned().collect()
    }
}
