//! One simulated inverter as a Modbus slave: its register bank over the model.

use ecowatt_proto::modbus::{Exception, ExceptionCode, MAX_READ_QUANTITY, Request, Response};
use ecowatt_proto::registers::{self, REGISTER_COUNT, WriteError};

use crate::model::{Model, ModelConfig, Reading};

/// A Modbus slave answering from a [`Model`].
#[derive(Debug, Clone)]
pub struct Inverter {
    slave: u8,
    model: Model,
    writes: std::collections::VecDeque<u16>,
    writes_total: u64,
}

/// Writes of the export limit an inverter remembers (oldest forgotten first).
pub const WRITES_KEPT: usize = 1_000;

impl Inverter {
    /// An inverter at `slave` with the given physics.
    pub fn new(slave: u8, config: ModelConfig) -> Self {
        Inverter { slave, model: Model::new(config), writes: Default::default(), writes_total: 0 }
    }

    /// The values the export limit was written with, oldest first (the
    /// last [`WRITES_KEPT`]), and how many writes there were in all: what a
    /// test counts to see that no command ran twice.
    pub fn writes(&self) -> (Vec<u16>, u64) {
        (self.writes.iter().copied().collect(), self.writes_total)
    }

    /// Its slave address.
    pub fn slave(&self) -> u8 {
        self.slave
    }

    /// Its model.
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// Everything it measures at `unix_ms`.
    pub fn read(&mut self, unix_ms: u64) -> Reading {
        self.model.read(unix_ms)
    }

    /// Answers one request at simulated time `unix_ms`, as the course's Inverter
    /// SIM does: quantity outside 1..=125 is exception 03, addresses outside the
    /// map exception 02, a write to a read-only register exception 02, a value
    /// outside the writable range exception 03.
    pub fn handle(&mut self, request: &Request, unix_ms: u64) -> Response {
        let refuse = |code| Response::Exception(Exception { function: request.function(), code });
        match *request {
            Request::ReadHoldingRegisters { start, quantity } => {
                if quantity == 0 || quantity > MAX_READ_QUANTITY {
                    return refuse(ExceptionCode::IllegalDataValue);
                }
                let end = usize::from(start) + usize::from(quantity);
                if end > REGISTER_COUNT {
                    return refuse(ExceptionCode::IllegalDataAddress);
                }
                let regs = self.model.read(unix_ms).to_registers();
                Response::ReadHoldingRegisters(regs[usize::from(start)..end].to_vec())
            }
            Request::WriteSingleRegister { address, value } => {
                match registers::check_write(address, value) {
                    Ok(_) => {
                        // Register 8 is the only writable one.
                        self.model.set_limit_pct(value);
                        self.writes_total += 1;
                        if self.writes.len() == WRITES_KEPT {
                            self.writes.pop_front();
                        }
                        self.writes.push_back(value);
                        Response::WriteSingleRegister { address, value }
                    }
                    Err(WriteError::OutOfRange { .. }) => refuse(ExceptionCode::IllegalDataValue),
                    Err(_) => refuse(ExceptionCode::IllegalDataAddress),
                }
            }
        }
    }
}
