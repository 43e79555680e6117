//! The inverter link: reads a block of holding registers and writes one, over
//! any transport that carries Modbus RTU frames (serial line, the SIM HTTP API,
//! Modbus TCP behind a translating transport).
//!
//! [`Transaction`] is the sans-IO heart: it owns the request frame, judges each
//! answer and decides whether to retry and after how long. [`Client`] drives it
//! over a [`Transport`] and a [`Delay`]. Results follow tokio-modbus:
//! `Result<Result<T, Exception>, TransportError>`, so "the device said no" is
//! data and only a broken link is an error.

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

use ecowatt_proto::modbus::{Exception, FrameError, Request, Response, rtu};

/// Carries one RTU request frame to the inverter and brings back its answer.
pub trait Transport {
    /// Sends a complete RTU request frame (CRC included) and returns the
    /// complete response frame. A transport that speaks another framing (Modbus
    /// TCP, the SIM's hex JSON) translates both ways.
    fn transact(&mut self, request: &[u8]) -> Result<Vec<u8>, TransportError>;
}

impl<T: Transport + ?Sized> Transport for &mut T {
    fn transact(&mut self, request: &[u8]) -> Result<Vec<u8>, TransportError> {
        (**self).transact(request)
    }
}

impl<T: Transport + ?Sized> Transport for alloc::boxed::Box<T> {
    fn transact(&mut self, request: &[u8]) -> Result<Vec<u8>, TransportError> {
        (**self).transact(request)
    }
}

/// Waits between retries. The Linux shell sleeps; tests record.
pub trait Delay {
    /// Waits `ms` milliseconds.
    fn delay_ms(&mut self, ms: u32);
}

impl<D: Delay + ?Sized> Delay for &mut D {
    fn delay_ms(&mut self, ms: u32) {
        (**self).delay_ms(ms)
    }
}

/// Why no valid answer came back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TransportError {
    /// No answer in time: a timeout, a dropped packet, or the SIM's blank answer.
    Timeout,
    /// An answer came, but it is not a valid answer to the request.
    Frame(FrameError),
    /// The link itself failed (connection refused or reset, serial port gone).
    Io(String),
    /// The far end refuses to carry our requests (wrong API key, wrong URL):
    /// a configuration problem that retrying will not fix.
    Refused(String),
}

impl TransportError {
    /// Whether trying again may help.
    pub fn is_retryable(&self) -> bool {
        !matches!(self, TransportError::Refused(_))
    }

    /// A stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            TransportError::Timeout => "timeout",
            TransportError::Frame(e) => e.code(),
            TransportError::Io(_) => "io",
            TransportError::Refused(_) => "refused",
        }
    }
}

impl fmt::Display for TransportError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TransportError::Timeout => f.write_str("no answer from the inverter (timeout)"),
            TransportError::Frame(e) => write!(f, "invalid answer: {e}"),
            TransportError::Io(msg) => write!(f, "link failure: {msg}"),
            TransportError::Refused(msg) => write!(f, "request refused: {msg}"),
        }
    }
}

impl core::error::Error for TransportError {}

impl From<FrameError> for TransportError {
    fn from(e: FrameError) -> Self {
        TransportError::Frame(e)
    }
}

/// How often and how patiently to retry a failed exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Total attempts, the first included (at least 1).
    pub attempts: u8,
    /// Wait before the first retry.
    pub initial_backoff_ms: u32,
    /// Upper bound of the wait, which doubles on each retry.
    pub max_backoff_ms: u32,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy { attempts: 3, initial_backoff_ms: 100, max_backoff_ms: 2_000 }
    }
}

impl RetryPolicy {
    /// Wait before retry number `retry` (1-based): doubling, capped.
    pub fn backoff_ms(&self, retry: u8) -> u32 {
        let doublings = u32::from(retry.saturating_sub(1)).min(31);
        self.initial_backoff_ms.saturating_mul(1 << doublings).min(self.max_backoff_ms)
    }
}

/// The answer to one request: data, or the device's refusal, or no valid answer.
pub type Outcome = Result<Result<Response, Exception>, TransportError>;

/// What the driver does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Wait `after_ms`, then send [`Transaction::frame`] again; `error` is why.
    Retry {
        /// Milliseconds to wait.
        after_ms: u32,
        /// What went wrong with the attempt just made.
        error: TransportError,
    },
    /// The transaction is over.
    Done(Outcome),
}

/// One request to one slave, with its retry budget: bytes in, decisions out.
#[derive(Debug, Clone)]
pub struct Transaction {
    slave: u8,
    request: Request,
    frame: Vec<u8>,
    policy: RetryPolicy,
    attempts_made: u8,
}

impl Transaction {
    /// Prepares `request` for `slave`.
    pub fn new(slave: u8, request: Request, policy: RetryPolicy) -> Self {
        let frame = rtu::encode_request(slave, &request);
        Transaction { slave, request, frame, policy, attempts_made: 0 }
    }

    /// The RTU frame to send (the same bytes on every attempt).
    pub fn frame(&self) -> &[u8] {
        &self.frame
    }

    /// Attempts made so far.
    pub fn attempts_made(&self) -> u8 {
        self.attempts_made
    }

    /// Feeds what the transport returned for the latest attempt.
    pub fn on_answer(&mut self, answer: Result<Vec<u8>, TransportError>) -> Step {
        self.attempts_made = self.attempts_made.saturating_add(1);
        let error = match answer
            .and_then(|frame| Ok(rtu::decode_reply(self.slave, &self.request, &frame)?))
        {
            Ok(Response::Exception(e)) => return Step::Done(Ok(Err(e))),
            Ok(response) => return Step::Done(Ok(Ok(response))),
            Err(error) => error,
        };
        if error.is_retryable() && self.attempts_made < self.policy.attempts.max(1) {
            Step::Retry { after_ms: self.policy.backoff_ms(self.attempts_made), error }
        } else {
            Step::Done(Err(error))
        }
    }
}

/// Counters of what happened on the link, for logs and reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkStats {
    /// Requests made by callers.
    pub requests: u64,
    /// Frames sent (requests plus retries).
    pub attempts: u64,
    /// Attempts that got no answer in time.
    pub timeouts: u64,
    /// Attempts whose answer failed its CRC.
    pub crc_errors: u64,
    /// Attempts whose answer was malformed in another way.
    pub frame_errors: u64,
    /// Attempts that failed on the link itself.
    pub io_errors: u64,
    /// Requests the device refused with an exception.
    pub exceptions: u64,
    /// Requests that ended without a valid answer.
    pub failures: u64,
}

impl LinkStats {
    fn count(&mut self, error: &TransportError) {
        match error {
            TransportError::Timeout => self.timeouts += 1,
            TransportError::Frame(FrameError::CrcMismatch { .. }) => self.crc_errors += 1,
            TransportError::Frame(_) => self.frame_errors += 1,
            TransportError::Io(_) | TransportError::Refused(_) => self.io_errors += 1,
        }
    }
}

/// A Modbus client for the inverter over transport `T`, waiting with `D`.
pub struct Client<T, D> {
    transport: T,
    delay: D,
    policy: RetryPolicy,
    stats: LinkStats,
}

impl<T: Transport, D: Delay> Client<T, D> {
    /// A client with the default [`RetryPolicy`].
    pub fn new(transport: T, delay: D) -> Self {
        Client { transport, delay, policy: RetryPolicy::default(), stats: LinkStats::default() }
    }

    /// Replaces the retry policy.
    pub fn with_policy(mut self, policy: RetryPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// What happened on the link so far.
    pub fn stats(&self) -> LinkStats {
        self.stats
    }

    /// The transport, e.g. to reconfigure it.
    pub fn transport_mut(&mut self) -> &mut T {
        &mut self.transport
    }

    /// Sends `request` to `slave`, retrying as the policy allows.
    pub fn execute(&mut self, slave: u8, request: Request) -> Outcome {
        self.stats.requests += 1;
        let mut tx = Transaction::new(slave, request, self.policy);
        loop {
            self.stats.attempts += 1;
            let answer = self.transport.transact(tx.frame());
            match tx.on_answer(answer) {
                Step::Retry { after_ms, error } => {
                    self.stats.count(&error);
                    self.delay.delay_ms(after_ms);
                }
                Step::Done(outcome) => {
                    match &outcome {
                        Ok(Err(_)) => self.stats.exceptions += 1,
                        Err(error) => {
                            self.stats.count(error);
                            self.stats.failures += 1;
                        }
                        Ok(Ok(_)) => {}
                    }
                    return outcome;
                }
            }
        }
    }

    /// Reads `quantity` holding registers from `start`.
    pub fn read_holding(
        &mut self,
        slave: u8,
        start: u16,
        quantity: u16,
    ) -> Result<Result<Vec<u16>, Exception>, TransportError> {
        Ok(match self.execute(slave, Request::ReadHoldingRegisters { start, quantity })? {
            Ok(Response::ReadHoldingRegisters(values)) => Ok(values),
            Ok(_) => unreachable!("Transaction checks the answer matches the request"),
            Err(e) => Err(e),
        })
    }

    /// Writes `value` to the holding register at `address`; success is the
    /// device's exact echo.
    pub fn write_single(
        &mut self,
        slave: u8,
        address: u16,
        value: u16,
    ) -> Result<Result<(), Exception>, TransportError> {
        Ok(self.execute(slave, Request::WriteSingleRegister { address, value })?.map(|_| ()))
    }
}
