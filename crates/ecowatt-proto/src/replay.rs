//! The replay window: the highest counter accepted and a 64-bit bitmap of the
//! 64 counters ending at it. A counter is accepted once; anything 64 or more
//! below the highest is refused. Check it only after the tag verifies, and
//! persist it in the same transaction as the message's effect.

/// Width of the window.
pub const WINDOW: u64 = 64;

/// Replay state for one sender and direction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReplayWindow {
    /// Highest counter accepted (0: none yet; counters start at 1).
    pub highest: u64,
    /// Bit `i` set: counter `highest - i` was accepted.
    pub bitmap: u64,
}

/// Why a counter was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplayError {
    /// Counter 0 is never used.
    Zero,
    /// Already accepted.
    Replayed,
    /// Below the window: too old to tell.
    TooOld,
}

impl ReplayError {
    /// A stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            ReplayError::Zero => "counter_zero",
            ReplayError::Replayed => "replayed",
            ReplayError::TooOld => "below_window",
        }
    }
}

impl ReplayWindow {
    /// Whether `counter` would be accepted, without changing anything.
    pub fn check(&self, counter: u64) -> Result<(), ReplayError> {
        if counter == 0 {
            return Err(ReplayError::Zero);
        }
        if counter > self.highest {
            return Ok(());
        }
        let age = self.highest - counter;
        if age >= WINDOW {
            return Err(ReplayError::TooOld);
        }
        if self.bitmap & (1 << age) != 0 { Err(ReplayError::Replayed) } else { Ok(()) }
    }

    /// Accepts `counter` if it is new, updating the window.
    pub fn accept(&mut self, counter: u64) -> Result<(), ReplayError> {
        self.check(counter)?;
        if counter > self.highest {
            let shift = counter - self.highest;
            self.bitmap = if shift >= WINDOW { 0 } else { self.bitmap << shift };
            self.bitmap |= 1;
            self.highest = counter;
        } else {
            self.bitmap |= 1 << (self.highest - counter);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_counter_once_reordering_inside_the_window() {
        let mut w = ReplayWindow::default();
        for c in [1, 3, 2, 10, 5, 70, 8] {
            assert_eq!(w.accept(c), Ok(()), "{c}");
        }
        for c in [1, 3, 2, 10, 70] {
            let e = w.accept(c).unwrap_err();
            assert!(matches!(e, ReplayError::Replayed | ReplayError::TooOld), "{c}: {e:?}");
        }
        assert_eq!(w.accept(7), Ok(()), "70 - 7 = 63: still inside");
        assert_eq!(w.accept(6), Err(ReplayError::TooOld));
        assert_eq!(w.accept(0), Err(ReplayError::Zero));
        assert_eq!(w.accept(1_000), Ok(()));
        assert_eq!(w.accept(999), Ok(()));
        assert_eq!(w.accept(1_000), Err(ReplayError::Replayed));
    }
}
