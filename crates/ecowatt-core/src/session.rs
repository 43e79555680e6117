//! The device side of protocol v1 as a sans-IO state machine: seals requests
//! with a counter that is never reused, across reboots too, and opens only the
//! one answer to the request outstanding.
//!
//! Counters are reserved in blocks of [`RESERVE_BLOCK`]: the key-value store
//! holds the first counter not yet reserved, written *before* any counter of a
//! new block is used. A power cut therefore skips at most one block and never
//! reuses a counter, and flash is written once per block, not per message.

use alloc::vec::Vec;
use core::fmt;

use ecowatt_proto::messages::MessageType;
use ecowatt_proto::seal::{self, DeviceKey, Direction, EnvelopeError, Header, Keys};

use crate::kv::{KeyValue, KvError};

/// Key under which the reservation is kept.
pub const COUNTER_KEY: &str = "proto.counter";
/// Counters reserved per write.
pub const RESERVE_BLOCK: u64 = 64;
/// Requests that may await their answers at once (a long poll and an upload, say).
pub const MAX_OUTSTANDING: usize = 4;

/// A sealed request and the counter its answer will be bound to.
#[derive(Debug, Clone)]
pub struct Sealed {
    /// The request's counter.
    pub counter: u64,
    /// The envelope to send.
    pub bytes: Vec<u8>,
}

/// What the device needs to talk to the server (from its provisioning file).
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// The device's numeric id.
    pub device_id: u32,
    /// Its 128-bit key.
    pub key: DeviceKey,
    /// The key's version (its low byte goes in every header).
    pub key_version: u32,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Credentials {{ device_id: {}, key_version: {}, key: .. }}",
            self.device_id, self.key_version
        )
    }
}

/// Why the session refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionError {
    /// The reservation could not be read or written: nothing was sent.
    Storage(KvError),
    /// The stored reservation is not 8 bytes.
    CorruptCounter,
    /// All 2^64 counters are used: the device needs a new key.
    CountersExhausted,
    /// Already [`MAX_OUTSTANDING`] requests await answers.
    TooManyOutstanding,
    /// An answer arrived with no request outstanding (late, or replayed).
    NoRequest,
    /// The envelope is not an authentic answer to the request outstanding.
    Envelope(EnvelopeError),
    /// Authentic, but not what the request expects (type, direction, device).
    Unexpected {
        /// The message type received.
        msg_type: u8,
    },
}

impl fmt::Display for SessionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SessionError::Storage(e) => write!(f, "{e}"),
            SessionError::CorruptCounter => f.write_str("stored message counter is corrupt"),
            SessionError::CountersExhausted => {
                f.write_str("message counters exhausted; rotate the device key")
            }
            SessionError::TooManyOutstanding => f.write_str("too many requests awaiting answers"),
            SessionError::NoRequest => f.write_str("answer with no request outstanding"),
            SessionError::Envelope(e) => write!(f, "answer refused: {e}"),
            SessionError::Unexpected { msg_type } => {
                write!(f, "unexpected answer type {msg_type:#04x}")
            }
        }
    }
}

impl core::error::Error for SessionError {}

impl From<KvError> for SessionError {
    fn from(e: KvError) -> Self {
        SessionError::Storage(e)
    }
}

/// The device's protocol state.
#[derive(Debug)]
pub struct Session {
    creds: Credentials,
    keys: Keys,
    next: u64,
    reserved_until: u64,
    outstanding: Vec<(u64, MessageType)>,
}

impl Session {
    /// The cipher of an image delivered encrypted to this device for the
    /// offer named by `token` ([`ecowatt_proto::delivery`]).
    pub fn delivery(
        &self,
        token: &[u8; 16],
        chunk_log2: u8,
        size: u64,
    ) -> ecowatt_proto::delivery::Delivery {
        ecowatt_proto::delivery::Delivery::new(&self.creds.key, token, chunk_log2, size)
    }

    /// Resumes after a (re)boot: continues after the last reservation and
    /// reserves a fresh block before anything is sent.
    pub fn start(creds: Credentials, kv: &mut impl KeyValue) -> Result<Session, SessionError> {
        let next = match kv.get(COUNTER_KEY)? {
            None => 1,
            Some(bytes) => {
                u64::from_be_bytes(bytes.try_into().map_err(|_| SessionError::CorruptCounter)?)
            }
        };
        let keys = Keys::derive(&creds.key);
        let mut session =
            Session { creds, keys, next, reserved_until: next, outstanding: Vec::new() };
        session.reserve(kv)?;
        Ok(session)
    }

    fn reserve(&mut self, kv: &mut impl KeyValue) -> Result<(), SessionError> {
        let until = self.next.checked_add(RESERVE_BLOCK).ok_or(SessionError::CountersExhausted)?;
        kv.set(COUNTER_KEY, &until.to_be_bytes())?;
        self.reserved_until = until;
        Ok(())
    }

    /// The counter the next request will carry.
    pub fn next_counter(&self) -> u64 {
        self.next
    }

    /// The device's numeric id.
    pub fn device_id(&self) -> u32 {
        self.creds.device_id
    }

    /// Seals a request; it awaits its answer until opened or abandoned.
    pub fn seal(
        &mut self,
        kv: &mut impl KeyValue,
        msg_type: MessageType,
        body: &[u8],
    ) -> Result<Sealed, SessionError> {
        if self.outstanding.len() >= MAX_OUTSTANDING {
            return Err(SessionError::TooManyOutstanding);
        }
        if self.next >= self.reserved_until {
            self.reserve(kv)?;
        }
        let counter = self.next;
        self.next += 1;
        let header = Header {
            msg_type: msg_type as u8,
            direction: Direction::Up,
            key_version: self.creds.key_version as u8,
            device_id: self.creds.device_id,
            counter,
        };
        self.outstanding.push((counter, msg_type));
        Ok(Sealed { counter, bytes: seal::seal(&self.keys, &header, None, body) })
    }

    /// Opens the answer to request `counter`: its expected type or an error
    /// message. Accepted once; the request then no longer awaits an answer.
    pub fn open(
        &mut self,
        counter: u64,
        envelope: &[u8],
    ) -> Result<(MessageType, Vec<u8>), SessionError> {
        let at = self
            .outstanding
            .iter()
            .position(|(c, _)| *c == counter)
            .ok_or(SessionError::NoRequest)?;
        let request = self.outstanding[at].1;
        let (header, body) =
            seal::open(&self.keys, envelope, Some(counter)).map_err(SessionError::Envelope)?;
        let msg_type = MessageType::from_byte(header.msg_type);
        let expected =
            msg_type.is_some_and(|t| Some(t) == request.answer() || t == MessageType::Error);
        if header.direction != Direction::Down
            || header.device_id != self.creds.device_id
            || !expected
        {
            return Err(SessionError::Unexpected { msg_type: header.msg_type });
        }
        self.outstanding.swap_remove(at);
        Ok((msg_type.expect("checked above"), body))
    }

    /// Gives up on request `counter` (timeout): its answer will be refused.
    pub fn abandon(&mut self, counter: u64) {
        self.outstanding.retain(|(c, _)| *c != counter);
    }
}
