use core::fmt;

/// Why bytes are not a valid Modbus frame (or not the answer to our request).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameError {
    /// Fewer bytes than the smallest frame of this kind.
    TooShort {
        /// Bytes received.
        len: usize,
        /// Smallest valid length.
        min: usize,
    },
    /// More bytes than the largest frame of this kind.
    TooLong {
        /// Bytes received.
        len: usize,
        /// Largest valid length.
        max: usize,
    },
    /// Fewer bytes than the answer's own length fields announce: it was cut
    /// short (a timeout in mid-answer, a line that went quiet).
    Incomplete {
        /// Bytes received.
        len: usize,
        /// Bytes the answer announces.
        expected: usize,
    },
    /// The CRC in the frame is not the CRC of its contents.
    CrcMismatch {
        /// CRC computed over the frame's contents.
        expected: u16,
        /// CRC carried by the frame.
        actual: u16,
    },
    /// The answer came from another slave than the one asked.
    SlaveMismatch {
        /// Slave address of the request.
        expected: u8,
        /// Slave address in the answer.
        actual: u8,
    },
    /// The answer's function code is not the request's (nor its exception form).
    FunctionMismatch {
        /// Function code of the request.
        expected: u8,
        /// Function code in the answer.
        actual: u8,
    },
    /// A function code this implementation does not speak.
    UnsupportedFunction {
        /// The function code.
        function: u8,
    },
    /// The frame's length is wrong for its function code.
    LengthMismatch {
        /// Function code.
        function: u8,
        /// Length that function requires.
        expected: usize,
        /// Length received.
        actual: usize,
    },
    /// A read response whose byte count field disagrees with the data present.
    ByteCountMismatch {
        /// Byte count declared in the frame.
        declared: u8,
        /// Data bytes actually present.
        actual: usize,
    },
    /// A read response with an odd byte count (registers are two bytes).
    OddByteCount {
        /// The byte count.
        count: u8,
    },
    /// A read response with another number of registers than requested.
    QuantityMismatch {
        /// Registers requested.
        requested: u16,
        /// Registers returned.
        returned: u16,
    },
    /// A write response that is not the echo of the request.
    EchoMismatch {
        /// (address, value) written.
        expected: (u16, u16),
        /// (address, value) echoed.
        actual: (u16, u16),
    },
    /// An MBAP header whose protocol identifier is not 0 (Modbus).
    NotModbusProtocol {
        /// The protocol identifier received.
        protocol: u16,
    },
    /// A Modbus TCP answer for another transaction than the one sent.
    TransactionMismatch {
        /// Transaction identifier sent.
        expected: u16,
        /// Transaction identifier received.
        actual: u16,
    },
}

impl FrameError {
    /// A stable machine-readable code for logs and API errors.
    pub fn code(&self) -> &'static str {
        match self {
            FrameError::TooShort { .. } => "too_short",
            FrameError::TooLong { .. } => "too_long",
            FrameError::Incomplete { .. } => "incomplete",
            FrameError::CrcMismatch { .. } => "crc_mismatch",
            FrameError::SlaveMismatch { .. } => "slave_mismatch",
            FrameError::FunctionMismatch { .. } => "function_mismatch",
            FrameError::UnsupportedFunction { .. } => "unsupported_function",
            FrameError::LengthMismatch { .. } => "length_mismatch",
            FrameError::ByteCountMismatch { .. } => "byte_count_mismatch",
            FrameError::OddByteCount { .. } => "odd_byte_count",
            FrameError::QuantityMismatch { .. } => "quantity_mismatch",
            FrameError::EchoMismatch { .. } => "echo_mismatch",
            FrameError::NotModbusProtocol { .. } => "not_modbus_protocol",
            FrameError::TransactionMismatch { .. } => "transaction_mismatch",
        }
    }
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            FrameError::TooShort { len, min } => {
                write!(f, "frame too short: {len} bytes, at least {min} needed")
            }
            FrameError::TooLong { len, max } => {
                write!(f, "frame too long: {len} bytes, at most {max} allowed")
            }
            FrameError::Incomplete { len, expected } => {
                write!(f, "incomplete answer: {len} of its {expected} bytes arrived")
            }
            FrameError::CrcMismatch { expected, actual } => {
                write!(f, "CRC mismatch: computed {expected:04X}, frame carries {actual:04X}")
            }
            FrameError::SlaveMismatch { expected, actual } => {
                write!(f, "answer from slave {actual:#04x}, asked slave {expected:#04x}")
            }
            FrameError::FunctionMismatch { expected, actual } => {
                write!(f, "answer has function {actual:#04x}, request had {expected:#04x}")
            }
            FrameError::UnsupportedFunction { function } => {
                write!(f, "unsupported function code {function:#04x}")
            }
            FrameError::LengthMismatch { function, expected, actual } => {
                write!(f, "function {function:#04x} frame must be {expected} bytes, got {actual}")
            }
            FrameError::ByteCountMismatch { declared, actual } => {
                write!(f, "byte count says {declared}, {actual} data bytes present")
            }
            FrameError::OddByteCount { count } => write!(f, "odd byte count {count}"),
            FrameError::QuantityMismatch { requested, returned } => {
                write!(f, "asked for {requested} registers, got {returned}")
            }
            FrameError::EchoMismatch { expected, actual } => write!(
                f,
                "write echo {}={} does not match request {}={}",
                actual.0, actual.1, expected.0, expected.1
            ),
            FrameError::NotModbusProtocol { protocol } => {
                write!(f, "MBAP protocol id {protocol} is not Modbus (0)")
            }
            FrameError::TransactionMismatch { expected, actual } => {
                write!(f, "answer to transaction {actual}, sent {expected}")
            }
        }
    }
}

impl core::error::Error for FrameError {}
