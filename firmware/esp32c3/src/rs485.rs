//! Modbus RTU to the inverter over UART1 and a MAX3485-class transceiver:
//! the driver-enable pin (DE and /RE tied) is high while a request goes out
//! and low while the answer comes back. The core's `link::Transaction`
//! decides validity, retries and backoff; this driver only moves bytes.

use alloc::vec::Vec;

use ecowatt_core::link::{Outcome, RetryPolicy, Step, Transaction, TransportError};
use ecowatt_proto::modbus::Request;
use embassy_time::{Duration, Timer, with_timeout};
use esp_hal::Async;
use esp_hal::gpio::Output;
use esp_hal::uart::Uart;

/// How long the inverter has to start answering.
const ANSWER_TIMEOUT: Duration = Duration::from_millis(1_000);
/// Silence that ends a frame: 3.5 characters at 9600 baud is 3.6 ms.
const FRAME_GAP: Duration = Duration::from_millis(5);
/// The longest RTU frame.
const MAX_FRAME: usize = 256;

/// The RS485 port.
pub struct Rs485 {
    uart: Uart<'static, Async>,
    driver_enable: Output<'static>,
}

impl Rs485 {
    /// The port on `uart`, with its transceiver's driver-enable pin.
    pub fn new(uart: Uart<'static, Async>, driver_enable: Output<'static>) -> Self {
        Rs485 { uart, driver_enable }
    }

    /// Sends one frame and returns the answer frame (what arrived before the
    /// line went quiet).
    async fn transact(&mut self, frame: &[u8]) -> Result<Vec<u8>, TransportError> {
        let io = |e: &dyn core::fmt::Debug| TransportError::Io(alloc::format!("{e:?}"));
        // Whatever a previous, late answer left in the FIFO is not this answer.
        let mut scratch = [0u8; 64];
        while self.uart.read_ready() {
            let _ = self.uart.read_async(&mut scratch).await;
        }
        self.driver_enable.set_high();
        let sent = async {
            self.uart.write_async(frame).await.map_err(|e| io(&e))?;
            self.uart.flush_async().await.map_err(|e| io(&e))
        }
        .await;
        self.driver_enable.set_low();
        sent?;
        let mut answer = Vec::new();
        let mut chunk = [0u8; 64];
        match with_timeout(ANSWER_TIMEOUT, self.uart.read_async(&mut chunk)).await {
            Err(_) => return Err(TransportError::Timeout),
            Ok(Err(e)) => return Err(io(&e)),
            Ok(Ok(n)) => answer.extend_from_slice(&chunk[..n]),
        }
        while answer.len() < MAX_FRAME {
            match with_timeout(FRAME_GAP, self.uart.read_async(&mut chunk)).await {
                Err(_) => break,
                Ok(Err(e)) => return Err(io(&e)),
                Ok(Ok(n)) => answer.extend_from_slice(&chunk[..n]),
            }
        }
        Ok(answer)
    }

    /// Runs one request to the end, with the link's retries.
    pub async fn execute(&mut self, slave: u8, request: Request) -> Outcome {
        let mut tx = Transaction::new(slave, request, RetryPolicy::default());
        loop {
            let answer = self.transact(tx.frame()).await;
            match tx.on_answer(answer) {
                Step::Retry { after_ms, .. } => Timer::after_millis(u64::from(after_ms)).await,
                Step::Done(outcome) => return outcome,
            }
        }
    }
}
