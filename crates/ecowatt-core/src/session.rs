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

/// What the device needs to talk to the server (from its provisioning file).
#[derive(Clone)]
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
    outstanding: Option<(u64, MessageType)>,
}

impl Session {
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
        let mut session = Session { creds, keys, next, reserved_until: next, outstanding: None };
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

    /// Seals a request; it becomes the one outstanding.
    pub fn seal(
        &mut self,
        kv: &mut impl KeyValue,
        msg_type: MessageType,
        body: &[u8],
    ) -> Result<Vec<u8>, SessionError> {
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
        self.outstanding = Some((counter, msg_type));
        Ok(seal::seal(&self.keys, &header, None, body))
    }

    /// Opens the answer to the outstanding request: its expected type or an
    /// error message. Accepted once; the request is then no longer outstanding.
    pub fn open(&mut self, envelope: &[u8]) -> Result<(MessageType, Vec<u8>), SessionError> {
        let (counter, request) = self.outstanding.ok_or(SessionError::NoRequest)?;
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
        self.outstanding = None;
        Ok((msg_type.expect("checked above"), body))
    }

    /// Gives up on the outstanding request (timeout): its answer will be refused.
    pub fn abandon(&mut self) {
        self.outstanding = None;
    }
}
